"""Where the paper is silent, emor3 follows the authors' release (docs/method.md, "Where the paper is silent"):
the SET prompt's layout and a sample's own question, the image budget the loaders check with, the RER judge's
missing-step rule and reply cap, and the loss normaliser per micro-batch."""

import json

import pytest
import torch
from PIL import Image

from emor3.config import Config, DataConfig, ModelConfig
from emor3.data import get_taxonomy, load_dataset
from emor3.engine.prompts import (DEFAULT_QUESTION, QUESTION_JOIN, SET_INSTRUCTION, build_set_messages,
                                  encode_samples, sample_prompt, set_prompt)
from emor3.experiment import Experiment, build_data, image_factor, tokenizer_corpus
from emor3.sft import set_examples

MIKELS = get_taxonomy("mikels8")


class _EchoProcessor:
    """Stands in for emor3.models.Processor: returns what it was asked to encode."""

    def encode_prompts(self, messages, images, **kw):
        return messages, images


def _user_text(messages) -> str:
    (turn,) = messages
    return "".join(c["text"] for c in turn["content"] if c["type"] == "text")


def _manifest(tmp_path, rows, sizes=None):
    for i, r in enumerate(rows):
        w, h = (sizes or {}).get(i, (56, 56))
        Image.new("RGB", (w, h), (10 * i, 80, 120)).save(tmp_path / f"{i}.png")
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


# ------------------------------------------------------------------------------------------------- SET prompt


def test_question_and_instruction_are_joined_by_a_blank_line():
    labels = ", ".join(MIKELS.labels)
    assert QUESTION_JOIN == "\n\n"
    assert set_prompt(MIKELS) == DEFAULT_QUESTION.replace("{labels}", labels) + "\n\n" + SET_INSTRUCTION
    assert set_prompt(MIKELS).count(SET_INSTRUCTION) == 1 and " You First" not in set_prompt(MIKELS)


def test_a_samples_own_question_replaces_the_default_one():
    q = "  What does this photo make people feel? Options: {labels}  "
    text = set_prompt(MIKELS, question=q)
    assert text == "What does this photo make people feel? Options: " + ", ".join(MIKELS.labels) + "\n\n" + SET_INSTRUCTION
    assert set_prompt(MIKELS, question="Which emotion?") == "Which emotion?\n\n" + SET_INSTRUCTION
    assert set_prompt(MIKELS, question="   ") == set_prompt(MIKELS), "an empty question falls back to the default"
    assert set_prompt(MIKELS, question=None) == set_prompt(MIKELS)
    msgs = build_set_messages(MIKELS, question="Which emotion?")
    assert msgs[0]["content"][0] == {"type": "image"} and _user_text(msgs) == "Which emotion?\n\n" + SET_INSTRUCTION


def test_easyr1_problem_reaches_every_prompt_the_run_sends(tmp_path):
    rows = [{"images": ["0.png"], "problem": "<image>Is this image amusing, awe-inspiring or sad?", "answer": "awe"},
            {"image": "1.png", "label": "fear"}]
    ds = load_dataset(_manifest(tmp_path, rows), "mikels8")
    with_q, without_q = ds.samples
    assert with_q.question == "Is this image amusing, awe-inspiring or sad?" and without_q.question is None
    taxes = {"mikels8": MIKELS}
    expected = [with_q.question + "\n\n" + SET_INSTRUCTION, set_prompt(MIKELS)]
    # rollout, evaluation and the trainer's prompt encoding
    messages, images = encode_samples(_EchoProcessor(), ds.samples, ["im0", "im1"], taxes)
    assert [_user_text(m) for m in messages] == expected and images == [["im0"], ["im1"]]
    # the text reward plug-ins see
    exp = Experiment(Config(), torch.device("cpu"), None, None, tmp_path, None, taxonomies=taxes)
    assert [exp.prompt_text(s) for s in ds.samples] == expected == [sample_prompt(s, taxes) for s in ds.samples]
    # Cold-Start SFT's SET examples
    sft = set_examples(ds.samples, ["im0", "im1"], ["r0", "r1"], taxes)
    assert [_user_text(e.messages) for e in sft] == expected
    # the tiny tokenizer's corpus holds the question
    assert with_q.question in tokenizer_corpus([MIKELS], [with_q.question])


# ------------------------------------------------------------------------------------------------- image budget


def test_image_factor_is_patch_times_merge():
    assert image_factor(Config(model=ModelConfig(tiny="tiny"))) == 28  # 14-px patches, merge 2
    assert image_factor(Config(model=ModelConfig(tiny="tiny-qwen3-vl"))) == 32  # 16-px patches, merge 2


def test_loaders_check_images_at_the_models_budget(tmp_path):
    # at max_pixels 112², a 1254x90 image's short side becomes 30 px: one 28-px block, but under one 32-px block
    rows = [{"image": "0.png", "label": "awe"}, {"image": "1.png", "label": "fear"}]
    f = _manifest(tmp_path, rows, sizes={1: (1254, 90)})

    def load(tiny):
        cfg = Config(model=ModelConfig(tiny=tiny, min_pixels=56 * 56, max_pixels=112 * 112),
                     data=DataConfig(train=str(f), taxonomy="mikels8", on_bad_sample="skip"))
        train, _, _ = build_data(cfg)
        return train

    qwen25, qwen3 = load("tiny"), load("tiny-qwen3-vl")
    assert len(qwen25) == 2 and qwen25.factor == 28 and qwen25.report.n_skipped == 0
    assert len(qwen3) == 1 and qwen3.factor == 32 and qwen3.report.n_skipped == 1
    assert qwen3.image(0).width % 32 == 0 and qwen3.image(0).height % 32 == 0
