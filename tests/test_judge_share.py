"""The RER judge's shared-prefix path equals the unshared one: the G consistency questions of a GRPO group share
the chat header, the image and the question, so `ModelJudge(share_prefix=True)` prefills that prefix once (the
image encoded once) and only each step-1 text per request. Compared here against `share_prefix=False` (every
request encoded and prefilled whole) on tiny real checkpoints in fp32: sampled tokens and texts identical for a
seed, recorded and choice log-probs within 1e-5."""

import pytest
import torch

from emor3.engine.sampler import sample
from emor3.rewards.reflection import (
    CONSISTENCY_QUESTION,
    JudgeRequest,
    ModelJudge,
    coherence_request,
    consistency_request,
    split_shared_prefixes,
)

LABELS = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
CORPUS = ["Can the following text describe the image? Please answer with yes or no. Yes No yes no. "
          "Which emotion best describes the text above? Answer the question using one emotional category (one "
          "word only): anger, disgust, fear, joy, sadness, surprise. A girl laughs at a puppy in the park. "
          "A dark alley at night. Rain on a window. A crowd cheers while fireworks light the sky."] * 20
# step-1 texts of different lengths; the second group repeats one (a converged policy's identical completions)
STEP1 = [
    ["A girl laughs.", "A girl laughs at a small puppy in the park on a sunny day.", "Joy.", "A puppy."],
    ["A dark alley at night.", "Rain.", "Rain.", "A dark alley at night, wet and empty, with one lamp."],
    ["A crowd cheers while fireworks light the sky above the stadium.", "Fireworks.", "A crowd", "Sky at night."],
]


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3-vl-thinking"])
def judge_model(request, tmp_path_factory):
    """A random tiny checkpoint (Qwen2.5-VL, and Qwen3-VL with the Thinking template, whose judge prompts end in an
    empty reasoning block) in fp32, and the real Processor."""
    from emor3.models.checkpoint import load_pretrained
    from emor3.models.processing import Processor
    from emor3.toy.model import build_tiny_checkpoint

    d = tmp_path_factory.mktemp(f"judge_share_{request.param}")
    build_tiny_checkpoint(d, CORPUS, name=request.param, image_pixels=128 * 128)
    return load_pretrained(d, dtype=torch.float32).eval(), Processor.from_pretrained(d)


def _images():
    """Three different images, of different sizes (so different image-token counts and prompt lengths)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(96, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.new("RGB", (64, 64), (255, 0, 0)), Image.fromarray(noise), Image.new("RGB", (128, 96), (0, 90, 40))]


def _consistency_requests():
    """B = 3 groups x G = 4 consistency questions, each group about its own image object."""
    return [consistency_request(s, im) for im, texts in zip(_images(), STEP1) for s in texts]


def test_split_rebuilds_every_prompt_and_shares_one_prefix_per_image(judge_model):
    model, proc = judge_model
    reqs = _consistency_requests()
    judge = ModelJudge(model, proc, share_prefix=False)
    full = judge.encode(reqs)
    pre, suf = split_shared_prefixes(full, [r.image for r in reqs], model.config.image_token_id)
    assert pre.input_ids.shape[0] == 3 and suf.prefix_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4, \
        "one prefix per image: the G questions about an image must share it"
    assert pre.image_grid_thw.shape[0] == 3 and torch.equal(pre.image_grid_thw, full.image_grid_thw[::4])
    for q in range(3):  # the shared part is the header, the image and the whole question
        text = proc.decode(pre.input_ids[q, pre.attention_mask[q].bool()].tolist(), skip_special_tokens=False)
        assert CONSISTENCY_QUESTION in text and (pre.input_ids[q] == model.config.image_token_id).any(), \
            f"prefix {q} must hold the image and the question: {text!r}"
    P = full.input_ids.shape[1]
    for r in range(len(reqs)):  # prefix + suffix == the whole prompt, token for token and position for position
        q = int(suf.prefix_index[r])
        pm, sm = pre.attention_mask[q].bool(), suf.attention_mask[r].bool()
        ids = torch.cat([pre.input_ids[q, pm], suf.input_ids[r, sm]])
        pos = torch.cat([pre.position_ids[:, q, pm], suf.position_ids[:, r, sm]], dim=1)
        fm = full.attention_mask[r].bool()
        assert torch.equal(ids, full.input_ids[r, fm]), f"request {r}: prefix + suffix != prompt"
        assert torch.equal(pos, full.position_ids[:, r, fm]), f"request {r}: M-RoPE positions changed by the split"
        assert int(sm.sum()) >= 1 and fm[P - 1], "every suffix keeps at least the prompt's last token"


def test_sampler_from_shared_prefixes_equals_whole_prompts(judge_model):
    """Same seed: the same tokens, masks and (within 1e-5) recorded log-probs, with G = 2 samples per request on top
    of the suffix rows."""
    model, proc = judge_model
    reqs = _consistency_requests()
    full = ModelJudge(model, proc, share_prefix=False).encode(reqs)
    pre, suf = split_shared_prefixes(full, [r.image for r in reqs], model.config.image_token_id)
    kw = dict(group_size=2, max_new_tokens=10, temperature=1.0, stop_token_ids=proc.stop_token_ids,
              banned_token_ids=proc.banned_token_ids, generator=7, check_every=2)
    a = sample(model, full, **kw)
    b = sample(model, pre, suffix=suf, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids), "shared-prefix sampling drew other tokens"
    assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.truncated, b.truncated)
    assert torch.equal(a.prompt_index, b.prompt_index)
    gap = (a.logprobs - b.logprobs).abs().max().item()
    assert gap <= 1e-5, f"recorded log-probs differ by {gap:.2e} between shared and whole prompts"
    assert len(set(map(tuple, a.completion_ids.tolist()))) > 1, "test setup: rows must sample different tokens"


def test_compiled_decode_from_shared_prefixes(judge_model):
    """The compiled decode step (backend "eager": dynamo's tracing without codegen, as tests/test_sampler.py) runs
    unchanged after a shared-prefix prefill: the cache slots are rounded up to the compile bucket there too."""
    model, proc = judge_model
    reqs = _consistency_requests()
    full = ModelJudge(model, proc, share_prefix=False).encode(reqs)
    pre, suf = split_shared_prefixes(full, [r.image for r in reqs], model.config.image_token_id)
    kw = dict(group_size=1, max_new_tokens=6, temperature=1.0, stop_token_ids=proc.stop_token_ids,
              banned_token_ids=proc.banned_token_ids, generator=7)
    a = sample(model, full, **kw)
    b = sample(model, pre, suffix=suf, compile="eager", **kw)
    assert torch.equal(a.completion_ids, b.completion_ids), "compiled shared-prefix decoding drew other tokens"
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_batch_size", [None, 5])
def test_judge_sample_mode_same_replies_shared_or_not(judge_model, max_batch_size):
    """max_batch_size 5 cuts groups across chunks: the chunks share what they can, the replies stay the same."""
    model, proc = judge_model
    reqs = _consistency_requests()
    replies = [ModelJudge(model, proc, max_new_tokens=6, seed=3, max_batch_size=max_batch_size,
                          share_prefix=share).generate(reqs) for share in (False, True)]
    assert replies[0] == replies[1], "a seeded judge must give the same replies with and without prefix sharing"
    assert len(set(replies[0])) > 1, "test setup: the replies must differ between requests"


def test_judge_logprob_mode_same_choice_logprobs_shared_or_not(judge_model):
    model, proc = judge_model
    reqs = _consistency_requests()
    # coherence questions are text only: they share the chat header (one text-only group); labels are multi-token
    coh = [coherence_request(s, "They would feel it.", LABELS) for texts in STEP1 for s in texts]
    yes_no = ["Yes", "yes", "No", "no"]
    for rq, choices in ((reqs, yes_no), (coh, LABELS)):
        got = [ModelJudge(model, proc, share_prefix=share).choice_logprobs(rq, [choices] * len(rq))
               for share in (False, True)]
        gap = max((x - y).abs().max().item() for x, y in zip(*got))
        assert gap <= 1e-5, f"choice log-probs differ by {gap:.2e} between shared and unshared judging"


def test_image_encoded_once_per_group(judge_model, monkeypatch):
    """Counts the images the vision tower encodes: one per group when sharing, one per request when not."""
    model, proc = judge_model
    reqs = _consistency_requests()
    seen = []
    enc = model.encode_images

    def counting(pixel_values, grid_thw):
        seen.append(grid_thw.shape[0])
        return enc(pixel_values, grid_thw)

    monkeypatch.setattr(model, "encode_images", counting)
    for share, want in ((True, 3), (False, 12)):
        for call in ("generate", "choice_logprobs"):
            seen.clear()
            judge = ModelJudge(model, proc, max_new_tokens=2, share_prefix=share)
            if call == "generate":
                judge.generate(reqs)
            else:
                judge.choice_logprobs(reqs, [["Yes", "No"]] * len(reqs))
            assert sum(seen) == want, f"{call}, share_prefix={share}: encoded {sum(seen)} images, expected {want}"


def test_requests_that_differ_before_the_image_fall_back_to_one_prefix_each(judge_model):
    """Two requests about one image object whose texts differ before the image cannot share it: each gets its own
    prefix (its whole prompt but the last token), still equal to the unshared judge."""
    model, proc = judge_model
    im = _images()[1]
    reqs = [JudgeRequest([{"role": "user", "content": [{"type": "text", "text": t}, {"type": "image"},
                                                       {"type": "text", "text": "Yes or no?"}]}], im)
            for t in ("A girl laughs.", "Rain.")]
    full = ModelJudge(model, proc, share_prefix=False).encode(reqs)
    pre, suf = split_shared_prefixes(full, [im, im], model.config.image_token_id)
    assert pre.input_ids.shape[0] == 2 and suf.attention_mask.sum(-1).tolist() == [1, 1]
    got = [ModelJudge(model, proc, share_prefix=share).choice_logprobs(reqs, [["Yes", "No"]] * 2)
           for share in (False, True)]
    gap = max((x - y).abs().max().item() for x, y in zip(*got))
    assert gap <= 1e-5, f"fallback prefixes changed the choice log-probs by {gap:.2e}"
