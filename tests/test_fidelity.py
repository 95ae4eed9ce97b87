"""Where the paper is silent, emor3 follows the authors' release (docs/method.md, "Where the paper is silent"):
the SET prompt's layout and a sample's own question, the image budget the loaders check with, the RER judge's
missing-step rule and reply cap, and the loss normaliser per micro-batch."""

import json

import pytest
import torch
from PIL import Image

from emor3.config import Config, DataConfig, GRPOConfig, ModelConfig
from emor3.data import get_taxonomy, load_dataset
from emor3.engine.prompts import (DEFAULT_QUESTION, QUESTION_JOIN, SET_INSTRUCTION, build_set_messages,
                                  encode_samples, sample_prompt, set_prompt)
from emor3.stages.build import build_data, image_factor
from emor3.stages.cold_start import set_examples
from emor3.toy.model import tokenizer_corpus

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
    # the text reward plug-ins see (emor3.grpo.rollout.score_prompts)
    assert [sample_prompt(s, taxes) for s in ds.samples] == expected
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


# ------------------------------------------------------------------------------------------------- RER defaults


class _ScriptedJudge:
    """Answers every consistency prompt "yes" and every coherence prompt "joy"; records what it was asked."""

    def __init__(self):
        self.asked = []

    def generate(self, requests):
        self.asked.append(len(requests))
        texts = [_user_text(r.messages) for r in requests]
        return ["joy" if "Which emotion" in t else "yes" for t in texts]


EMO6 = get_taxonomy("emotion6")
FULL = "<step1>A girl laughs.</step1><step2>Happy.</step2><step3>positive</step3>\\boxed{joy}"
NO_STEP1 = "<step2>Happy.</step2><step3>positive</step3>\\boxed{joy}"
NO_STEP2 = "<step1>A girl laughs.</step1>\\boxed{joy}"


@pytest.mark.parametrize("rule, cons, coh", [("release", [1.0, 0.0, 1.0], [1.0, 0.5, 0.5]),
                                             ("neutral", [1.0, 0.5, 1.0], [1.0, 0.5, 0.5])])
def test_missing_steps_score_as_the_release_does_by_default(rule, cons, coh):
    from emor3.rewards.reflection import reflect

    judge = _ScriptedJudge()
    out = reflect([FULL, NO_STEP1, NO_STEP2], ["joy"] * 3, EMO6, ["a", "b", "c"], judge, mode="sample", missing=rule)
    assert out.consistency.tolist() == cons and out.coherence.tolist() == coh
    assert judge.asked == [2, 1], "rows without the judged steps are not sent to the judge"
    assert out.judged_consistency.tolist() == [True, False, True]
    if rule == "release":
        default = reflect([FULL, NO_STEP1, NO_STEP2], ["joy"] * 3, EMO6, ["a", "b", "c"], _ScriptedJudge())
        assert default.consistency.tolist() == cons, "the release's rule is reflect's default"


def _parse(argv):
    from emor3.config import parse_args

    return parse_args(argv, "python -m emor3.grpo.train", "")


@pytest.mark.parametrize("flag, value", [("--reward.missing-step", "zero"), ("--grpo.loss-scope", "sequence"),
                                         ("--grpo.compile", "bogus")])
def test_an_unknown_run_time_choice_is_a_usage_error_naming_its_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:  # refused at parse time, before SFT and the baseline evaluation
        _parse([flag, value])
    assert e.value.code == 2, "a bad choice must be an argparse usage error"
    assert flag in capsys.readouterr().err, "the error must name the flag"


def test_auto_choices_follow_the_release_with_a_checkpoint_and_keep_the_tiny_run(tmp_path):
    from emor3.config import config_from_dict, load_toml, save_config

    picked = lambda c: (c.reward.judge_max_new_tokens, c.reward.missing_step, c.grpo.loss_scope)  # noqa: E731
    # parsing resolves every model-dependent auto: a checkpoint follows the release (an instruct model's judge
    # replies get 32 tokens: "Based on the image, yes"), the tiny model keeps the choices its results were made with
    assert picked(_parse([])) == (8, "neutral", "mini-batch")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")  # parsing checks the folder is a checkpoint's
    ckpt = _parse(["--model", str(tmp_path / "ckpt")])
    assert picked(ckpt) == (32, "release", "micro-batch")
    chosen = _parse(["--model", str(tmp_path / "ckpt"), "--reward.judge-max-new-tokens", "8",
                     "--reward.missing-step", "neutral", "--grpo.loss-scope", "mini-batch"])
    assert picked(chosen) == (8, "neutral", "mini-batch"), "a choice given explicitly is kept"
    # what a run records (config.toml): the choices made, reading back to the same config
    save_config(ckpt, tmp_path / "config.toml")
    back = config_from_dict(load_toml(tmp_path / "config.toml"))
    assert picked(back) == (32, "release", "micro-batch") and back.resolved() == back


# ------------------------------------------------------------------------------------------------- loss normaliser


def test_micro_batch_scope_is_the_mean_of_each_micro_batchs_token_mean():
    from emor3.grpo.objective import aggregate, loss_normalizer
    from emor3.grpo.step import micro_normalizer

    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=g)  # (N, T) per-token losses of one mini-batch, 2 micro-batches of 2 rows
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0],  # micro-batch 1: 3 tokens
                         [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.float32)  # micro-batch 2: 10 tokens
    micro = [slice(0, 2), slice(2, 4)]
    # the release (verl): each micro-batch's own token-mean, divided by the 2 accumulation steps
    means = [float((values[m] * mask[m]).sum() / mask[m].sum()) for m in micro]
    want_release = (means[0] + means[1]) / 2
    got = sum(float(aggregate(values[m], mask[m], normalizer=micro_normalizer(mask[m], "token-mean", 6, 2)))
              for m in micro)
    assert got == pytest.approx(want_release, rel=1e-6)
    # ours: one token-mean over the 13 tokens of the mini-batch
    want_ours = float((values * mask).sum() / 13)
    total = loss_normalizer(mask)
    assert sum(float(aggregate(values[m], mask[m], normalizer=total)) for m in micro) == pytest.approx(want_ours, rel=1e-6)
    assert abs(want_release - want_ours) > 1e-3, "the two scopes differ when micro-batches hold different token counts"


# ------------------------------------------------------------------------------------------------- release-exact options


@pytest.mark.parametrize("reply, lenient, exact", [
    ("sadness", 1.0, 1.0), ("Sadness", 1.0, 1.0),  # the release lower-cases both sides
    ("Sadness.", 1.0, 0.0), (" sadness", 1.0, 0.0), ("**Sadness**", 1.0, 0.0), ("sadness\n", 1.0, 0.0),
    ("None", 0.5, 0.5), ("none", 0.5, 0.5), ("", 0.5, 0.5),  # the release's `not response or == 'none'`
    ("None.", 0.5, 0.0), (" none", 0.5, 0.0),
    ("fear", 0.0, 0.0), ("sadness, fear", 0.0, 0.0),
])
def test_coherence_match_exact_is_the_releases_string_equality(reply, lenient, exact):
    from emor3.rewards.reflection import score_coherence_reply

    assert score_coherence_reply(reply, "sadness") == lenient, "lenient: word-level match (the default)"
    assert score_coherence_reply(reply, "sadness", "exact") == exact, "exact: reply.lower() == label.lower()"


def test_release_weights_switch_on_the_release_judge_and_explicit_choices_win():
    from emor3.config import RewardConfig

    picked = lambda c: (c.reward.coherence_match, c.reward.judge_prompt)  # noqa: E731
    assert picked(_parse([])) == ("lenient", "clean")
    assert picked(_parse(["--reward.weights", "release"])) == ("exact", "release"), "config.toml records the choice"
    mixed = _parse(["--reward.weights", "release", "--reward.coherence-match", "lenient",
                    "--reward.judge-prompt", "clean"])
    assert picked(mixed) == ("lenient", "clean")
    assert Config().grpo.reference == "sft" and GRPOConfig(reference="init").reference == "init"


class _RecordingJudge:
    """Replies "None" to every consistency prompt and "Joy" to every coherence prompt; records the prompts' text."""

    def __init__(self):
        self.texts = []

    def generate(self, requests):
        texts = [_user_text(r.messages) for r in requests]
        self.texts += texts
        return ["Joy" if "Which emotion" in t else "None" for t in texts]


def test_release_judge_prompts_keep_the_tags_and_join_without_separator():
    from emor3.rewards.reflection import reflect

    done = "<step1> A girl laughs. </step1>\n<step2>Happy.</step2><step3>positive</step3>\\boxed{joy}"
    no_step2 = "<step1>A girl laughs.</step1><step3>positive</step3>\\boxed{joy}"
    judge = _RecordingJudge()
    out = reflect([done, no_step2], ["joy"] * 2, EMO6, ["im0", "im1"], judge, prompt="release", match="exact",
                  missing="release")
    labels = ", ".join(EMO6.labels)
    assert judge.texts == [
        "\nCan the following text describe the image?Please answer with yes or no.<step1> A girl laughs. </step1>",
        "<step1> A girl laughs. </step1>\n<step2>Happy.</step2>\nWhich emotion best describes the text above?\n"
        f"Answer the question using one emotional category (one word only): {labels}.",
    ], "the release's text: tags kept, no space inside the question, nothing after it"
    # "None" has no word "yes" or "no" (0.5); "Joy" lower-cases to the label (1); the completion without <step2>
    # has no span for either judge: the release's missing-step scores (0, 0.5)
    assert out.consistency.tolist() == [0.5, 0.0] and out.coherence.tolist() == [1.0, 0.5]
    clean = _RecordingJudge()
    reflect([done], ["joy"], EMO6, ["im0"], clean)
    assert clean.texts[0] == "Can the following text describe the image? Please answer with yes or no.\nA girl laughs."


def test_micro_batches_below_G_rows_split_each_group_into_equal_slices():
    from emor3.grpo.step import micro_batches

    split = micro_batches(torch.tensor([3, 5]), 8, 4)  # the release: 4 rows per GPU at G = 8
    assert [(p.tolist(), r.tolist()) for p, r in split] == [([3], [24, 25, 26, 27]), ([3], [28, 29, 30, 31]),
                                                            ([5], [40, 41, 42, 43]), ([5], [44, 45, 46, 47])]
    whole = micro_batches(torch.tensor([0, 1, 2]), 4, 8)  # 8 rows at G = 4: two whole groups, then the last one
    assert [(p.tolist(), r.tolist()) for p, r in whole] == [([0, 1], list(range(8))), ([2], list(range(8, 12)))]
    from emor3.config import ConfigError, validate_config

    validate_config(Config(grpo=GRPOConfig(group_size=8, micro_batch_rows=4)))
    with pytest.raises(ConfigError, match="micro-batch-rows.*= 3: must divide --grpo.group-size"):
        validate_config(Config(grpo=GRPOConfig(group_size=8, micro_batch_rows=3)))


def test_release_normaliser_over_a_split_group_is_the_mean_of_micro_token_means():
    from emor3.grpo.objective import aggregate
    from emor3.grpo.step import micro_batches, micro_normalizer

    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0], [7.0, 8.0, 9.0]])  # one group, G = 4
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    micro = micro_batches(torch.tensor([0]), 4, 2)  # 2 micro-batches of 2 rows
    got = sum(float(aggregate(values[r], mask[r], normalizer=micro_normalizer(mask[r], "token-mean", 3, len(micro))))
              for _, r in micro)
    # verl: (token-mean of rows 0-1 = 10 / 4, token-mean of rows 2-3 = 35 / 5) / 2 accumulation steps
    assert got == pytest.approx((10 / 4 + 35 / 5) / 2)
    assert got != pytest.approx(45 / 9), "the mini-batch token-mean (45 / 9) is a different normaliser"


def test_split_groups_give_the_mini_batch_gradient_of_whole_groups(tmp_path, monkeypatch):
    """--grpo.loss-scope mini-batch: 1 row per micro-batch at G = 2 (each group split) and 2 rows (whole groups)
    make the same update, so the same logged loss and gradient norm. A length reward varies within every group, and
    the second mini-batch's ratio and KL differ from 1 and 0 after the first update, so nothing compared is 0."""
    from emor3.config import config_from_dict
    from emor3.grpo.train import train

    (tmp_path / "emor3_fidelity_plugin.py").write_text(
        "def length_reward(prompts, completions, **kw):\n    return [len(c) / 100.0 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    logged = {}
    for rows in (2, 1):
        cfg = config_from_dict({
            "data": {"emoscenes_train": 8, "emoscenes_test": 2, "emoscenes_ood": 1, "cold_start": 4,
                     "cache_dir": str(tmp_path / "emoscenes")},
            "sft": {"steps": 0, "instruct_steps": 0},
            "grpo": {"steps": 1, "prompts_per_step": 4, "mini_batch_prompts": 2, "group_size": 2,
                     "micro_batch_rows": rows, "max_new_tokens": 8, "loss_scope": "mini-batch", "kl_coef": 0.05},
            "reward": {"judge_max_new_tokens": 2, "plugins": ["emor3_fidelity_plugin:length_reward=1.0"]},
            "eval": {"max_new_tokens": 2, "batch_size": 8},
            "run": {"out": str(tmp_path / f"rows{rows}"), "progress": False},
        })
        train(cfg)
        logged[rows] = json.loads((tmp_path / f"rows{rows}" / "metrics.jsonl").read_text().splitlines()[0])
    whole, split = logged[2], logged[1]
    assert whole["reward/total"] == split["reward/total"], "the micro-batch size must not change the rollouts"
    assert abs(whole["pg_loss"]) > 1e-4 and whole["kl"] > 0, "the comparison is vacuous when loss and KL are 0"
    for k in ("loss", "pg_loss", "kl", "grad_norm"):
        assert split[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-7), f"{k} depends on splitting the groups"


def test_reference_init_is_the_model_before_cold_start_sft(tmp_path):

    from emor3.models.lora import add_lora
    from emor3.stages.build import reference_model
    from emor3.toy.model import build_tiny_checkpoint

    init = build_tiny_checkpoint(tmp_path / "init", tokenizer_corpus([MIKELS]), seed=0, vocab_size=512)
    w = "model.embed_tokens.weight"
    before = init.state_dict()[w].clone()

    def reference(choice: str, lora: bool = False):
        model = build_tiny_checkpoint(tmp_path / f"m{choice}{lora}", tokenizer_corpus([MIKELS]), seed=0, vocab_size=512)
        with torch.no_grad():
            model.state_dict()[w].add_(1.0)  # what Cold-Start SFT would have moved
        if lora:
            add_lora(model, rank=2, alpha=2.0)
        cfg = Config(grpo=GRPOConfig(reference=choice)).resolved()
        return reference_model(cfg, model, tmp_path / "init", tmp_path / "init", False, torch.device("cpu"))

    assert torch.equal(reference("sft").state_dict()[w], before + 1.0), "sft: the model GRPO starts from"
    assert torch.equal(reference("init").state_dict()[w], before), "init: the checkpoint before Cold-Start SFT"
    assert reference("sft", lora=True) is None, "LoRA + sft: the policy with its adapters off, no copy"
    assert torch.equal(reference("init", lora=True).state_dict()[w], before), "LoRA + init keeps the initial model"


def test_cold_start_judge_examples_follow_the_runs_judge_prompt():
    from emor3.rewards.reflection import release_coherence_request, release_consistency_request, release_spans
    from emor3.stages.cold_start import judge_examples

    responses = ["<step1>A girl laughs.</step1><step2>Happy.</step2><step3>positive</step3>\\boxed{amusement}",
                 "<step1>A dark alley.</step1><step2>Uneasy.</step2><step3>negative</step3>\\boxed{fear}"]
    samples = [type("S", (), {"label": lab, "taxonomy": "mikels8"})() for lab in ("amusement", "fear")]
    taxes = {"mikels8": MIKELS}
    out = judge_examples(samples, ["im0", "im1"], responses, taxes, prompt="release")
    spans = [release_spans(r) for r in responses]
    # per sample: its own step 1 -> yes, the other's -> no, its steps 1-2 -> the label, in the judge's own text
    assert [(e.messages, e.response) for e in out[:3]] == [
        (release_consistency_request(spans[0][0], "im0").messages, "yes"),
        (release_consistency_request(spans[1][0], "im0").messages, "no"),
        (release_coherence_request(spans[0][1], MIKELS.labels).messages, "amusement")]
    clean = judge_examples(samples, ["im0", "im1"], responses, taxes)
    assert "<step1>" not in _user_text(clean[0].messages), "the default keeps the clean text the judge reads"
