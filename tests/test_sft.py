"""Cold-Start SFT: its examples (SET and RER judge answers) and that training lowers the response NLL."""

import torch

from emor3.config import SFTConfig
from emor3.data import get_taxonomy
from emor3.data.emoscenes import make_emoscenes
from emor3.experiment import tokenizer_corpus
from emor3.models import Processor, load_pretrained
from emor3.models.tiny import build_tiny_checkpoint
from emor3.rewards import SET_INSTRUCTION, parse_set
from emor3.rewards.reflection import COHERENCE_QUESTION, CONSISTENCY_QUESTION
from emor3.sft import judge_examples, set_examples, sft


def _text(example) -> str:
    return " ".join(c.get("text", "") for m in example.messages for c in m["content"] if isinstance(c, dict))


def _cold(n=8):
    data = make_emoscenes(seed=0, n_train=32, n_test=0, n_ood=0, image_size=56, n_coldstart=n)
    cold = data["coldstart"]
    return cold, [cold.image(i) for i in range(len(cold))], [s.metadata["response"] for s in cold.samples]


def test_set_and_judge_examples():
    cold, images, responses = _cold()
    tax = {"mikels8": get_taxonomy("mikels8")}
    sets = set_examples(cold.samples, images, responses, tax)
    assert len(sets) == 8 and all(SET_INSTRUCTION in _text(e) and e.images == [im] for e, im in zip(sets, images))
    judges = judge_examples(cold.samples, images, responses, tax, seed=0)
    cons = [e for e in judges if CONSISTENCY_QUESTION in _text(e)]
    coh = [e for e in judges if COHERENCE_QUESTION in _text(e)]
    assert len(cons) == 16 and len(coh) == 8, "per sample: a yes, a no and a coherence example"
    for i, s in enumerate(cold.samples):
        yes, no = cons[2 * i], cons[2 * i + 1]
        own = parse_set(responses[i]).step1
        assert yes.response == "yes" and own in _text(yes) and yes.images == [images[i]]
        assert no.response == "no" and own not in _text(no) and no.images == [images[i]], \
            "the 'no' example must pair the image with another sample's step 1"
        assert coh[i].response == s.label and coh[i].images == [], "coherence is text only and answers the label"
        assert ", ".join(tax["mikels8"].labels) in _text(coh[i])


def test_sft_lowers_the_response_nll(tmp_path):
    tax = {"mikels8": get_taxonomy("mikels8")}
    build_tiny_checkpoint(tmp_path / "m", tokenizer_corpus(tax.values()), seed=0, vocab_size=512, image_pixels=56 * 56)
    model, proc = load_pretrained(tmp_path / "m"), Processor.from_pretrained(tmp_path / "m")
    cold, images, responses = _cold(4)
    examples = set_examples(cold.samples, images, responses, tax) + judge_examples(cold.samples, images, responses, tax)
    losses = sft(model, proc, examples, SFTConfig(steps=12, batch_size=8, lr=3e-3), progress=False)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, f"SFT did not lower the NLL: {losses}"
