"""The whole run on a tiny model: smoke (every parameter moves), exact resume, SIGTERM checkpoint, bad samples,
config round trip, evaluation arithmetic, and the batch plumbing the loop relies on."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emor3.config import Config, config_from_dict, load_toml, parse_args, save_config
from emor3.data.dataset import BadSampleError
from emor3.grpo.step import grpo_step
from emor3.checkpoints import latest_checkpoint
from emor3.grpo.train import train
from emor3.models import load_pretrained

REPO = Path(__file__).resolve().parents[1]

# A run small enough for CI: 2 prompts x 2 samples, 16 new tokens, a handful of eval images.
TINY = {
    "data": {"emoscenes_train": 16, "emoscenes_test": 4, "emoscenes_ood": 2, "cold_start": 4},
    "sft": {"steps": 2, "batch_size": 4, "instruct_steps": 0},
    "grpo": {"steps": 2, "prompts_per_step": 2, "mini_batch_prompts": 2, "group_size": 2, "micro_batch_rows": 2,
             "max_new_tokens": 16, "lr": 1e-3, "weight_decay": 0.0},
    "reward": {"judge_max_new_tokens": 3},
    "eval": {"max_new_tokens": 8, "batch_size": 8},
    "run": {"progress": False, "sample_every": 1},
}

PLUGIN = '''
def length_reward(prompts, completions, **kw):
    """Varies within every group, so advantages are never all zero and every parameter gets a gradient."""
    return [len(c) / 100.0 for c in completions]
'''


def tiny_config(tmp_path: Path, **sections) -> Config:
    d = {k: dict(v) for k, v in TINY.items()}
    d["data"]["cache_dir"] = str(tmp_path / "emoscenes")
    d["run"]["out"] = str(tmp_path / "run")
    for sec, values in sections.items():
        d.setdefault(sec, {}).update(values)
    return config_from_dict(d)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "emor3_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "emor3_test_plugin:length_reward=1.0"


def _params(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_pretrained(path).state_dict())


def test_two_grpo_steps_move_every_parameter(tmp_path, plugin):
    cfg = tiny_config(tmp_path, reward={"plugins": [plugin]}, sft={"steps": 0})
    results = train(cfg)
    out = Path(cfg.run.out)
    before, after = _params(out / "init"), _params(latest_checkpoint(out) / "model")
    frozen = [k for k in before if torch.equal(before[k], after[k])]
    assert not frozen, f"parameters that never moved (no gradient reached them): {frozen}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    G, max_new = cfg.grpo.group_size, cfg.grpo.max_new_tokens
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm"))
        assert r["skipped_updates"] == 0 and r["grad_norm"] > 0 and r["kl"] >= 0 and r["entropy"] > 0
        assert r["loss"] >= r["pg_loss"], "loss = pg_loss + β·KL with KL k3 >= 0"
        assert r["logp_gap"] < 1e-4, "sampler and trainer log-probs must agree in fp32 (same model, same inputs)"
        # the logged total is the weighted sum of the logged components (paper weights + the plug-in at 1.0)
        assert r["reward/total"] == pytest.approx(
            0.8 * r["reward/accuracy"] + 0.05 * r["reward/consistency"] + 0.05 * r["reward/coherence"]
            + 0.1 * r["reward/format"] + r["reward/length_reward"], abs=1e-6)
        assert r["accuracy"] == pytest.approx(r["reward/accuracy"]) and r["format_rate"] == pytest.approx(r["reward/format"])
        for k in ("accuracy", "format_rate", "reward/consistency", "reward/coherence", "clip_frac_low",
                  "clip_frac_high", "clip_frac_dual", "zero_std_group_frac", "truncation_rate"):
            assert 0.0 <= r[k] <= 1.0, f"{k} = {r[k]} is not a fraction"
        assert r["reward/length_reward"] > 0 and r["advantage_abs_mean"] > 0, "the plug-in reward varies: A != 0"
        assert r["ratio_min"] <= r["ratio_mean"] <= r["ratio_max"]
        assert 1 <= r["completion_len_mean"] <= r["completion_len_max"] <= max_new
        assert all(r[k] >= 0 for k in ("time/rollout", "time/judge", "time/reference", "time/update"))
        assert r["time/step"] >= r["time/update"] and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["lr"] == cfg.grpo.lr
    assert rows[0]["ratio_min"] == rows[0]["ratio_max"] == pytest.approx(1.0), \
        "on-policy first update: every ratio is exactly 1"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * (2 * G) + [2] * (2 * G), "2 groups of samples every step"
    assert all({"prompt", "completion", "accuracy", "format", "total"} <= set(s) for s in samples)
    assert set(results) == {"initial", "emo_r3"}, "the table has the starting point and the trained policy"
    table = (out / "results.md").read_text().splitlines()
    sets = list(results["emo_r3"]["sets"])
    assert sets == ["test", "compositional", "ood_render", "ood_unseen"], \
        "validation, ood_emotion6 and ood_binary are drawn but not in the table"
    assert table[0].startswith("| Model | test^I | compositional | ood_render | ood_unseen | run A^I | run A^O | "
                               "run A | format % | no step 1 % | cue recall % | hallucinated cues % |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| initial", "| emo_r3"]
    acc = results["emo_r3"]["sets"]["test"]["accuracy"]
    lo, hi = results["emo_r3"]["sets"]["test"]["accuracy_ci"]
    assert table[3].split(" | ")[1] == f"{acc:.2f} [{lo:.1f}, {hi:.1f}]", "the table shows the evaluated accuracy"


def test_a_new_run_in_an_old_folder_is_refused_unless_overwrite(tmp_path, capsys):
    from emor3.folders import RunFolderError

    cfg = tiny_config(tmp_path, grpo={"steps": 1}, sft={"steps": 0})
    train(cfg)
    out = Path(cfg.run.out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="--resume .*--overwrite"):
        train(cfg)  # neither --resume nor --overwrite: the earlier run is left as it is
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "notes.txt").write_text("mine")
    train(config_from_dict({**_as_dict(cfg), "run": {**_as_dict(cfg)["run"], "overwrite": True}}))
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1, "a replacing run must not append its metrics to an earlier run's"
    assert (out / "notes.txt").read_text() == "mine", "--overwrite removes a run's files, nothing else"
    assert "--overwrite: removing" in capsys.readouterr().out
    assert "overwrite = false" in (out / "config.toml").read_text(), "a saved config never carries --overwrite"


def _as_dict(cfg):
    from emor3.config import config_to_dict

    return config_to_dict(cfg)


def test_resume_is_bit_exact(tmp_path, plugin):
    """1 step, resumed for a second, equals 2 steps in one go; and at the constant learning rate the 2-step run's
    checkpoint after step 1 is the 1-step run's model (benchmarks/selection.py --stage budget reads step budgets
    off one run's checkpoints)."""
    full = tiny_config(tmp_path / "a", reward={"plugins": [plugin]}, grpo={"steps": 2},
                       run={"save_every": 1, "keep_checkpoints": 2})
    train(full)
    half = tiny_config(tmp_path / "b", reward={"plugins": [plugin]}, grpo={"steps": 1})
    train(half)
    out_b = Path(half.run.out)
    a1, b1 = _params(Path(full.run.out) / "checkpoint-1" / "model"), _params(out_b / "checkpoint-1" / "model")
    assert all(torch.equal(a1[k], b1[k]) for k in a1), "a 2-step run's step-1 checkpoint is not the 1-step run's"
    # continue the stopped run for one more step: --resume RUN_DIR reads the run's own config, flags override it
    resumed = parse_args(["--resume", str(out_b), "--grpo.steps", "2"], "test", "")
    assert resumed.run.out == str(out_b) and resumed.grpo.group_size == 2
    train(resumed)
    a, b = _params(latest_checkpoint(Path(full.run.out)) / "model"), _params(latest_checkpoint(out_b) / "model")
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"2 steps in one go differ from 1 + resume + 1 in {diff[:5]}"
    ma = [json.loads(x) for x in (Path(full.run.out) / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (out_b / "metrics.jsonl").read_text().splitlines()]
    assert ma[1]["loss"] == mb[1]["loss"] and ma[1]["reward/total"] == mb[1]["reward/total"]


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    cfg = tiny_config(tmp_path, grpo={"steps": 1000}, sft={"steps": 0})
    cfg_path = tmp_path / "cfg.toml"
    save_config(cfg, cfg_path)
    proc = subprocess.Popen([sys.executable, "-m", "emor3.grpo.train", "--config", str(cfg_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = Path(cfg.run.out) / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):  # the first step logged
        time.sleep(0.5)
    assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate()
    assert proc.returncode == 0, f"SIGTERM must end the run cleanly, got {proc.returncode}:\n{output}"
    assert "SIGTERM" in output and "--resume" in output
    state = torch.load(latest_checkpoint(Path(cfg.run.out)) / "trainer_state.pt", weights_only=True)
    steps_logged = len(metrics.read_text().splitlines())
    assert state["step"] == steps_logged >= 1, "the checkpoint holds the last finished step"


HALF_CONSTANT = '''
def half_constant(prompts, completions, id, **kw):
    """Constant (0) for about half of the prompts (chosen by id), the completion's length elsewhere."""
    return [0.0 if sum(map(ord, i)) % 2 else len(c) / 100.0 for c, i in zip(completions, id)]
'''


def test_dapo_keeps_only_informative_groups(tmp_path, monkeypatch):
    (tmp_path / "emor3_half_plugin.py").write_text(HALF_CONSTANT)
    monkeypatch.syspath_prepend(str(tmp_path))
    references = []

    def spy(cfg, setup, stream, policy, reference, *args):  # what grpo_step is given
        references.append(reference)
        return grpo_step(cfg, setup, stream, policy, reference, *args)

    monkeypatch.setattr("emor3.stages.grpo.grpo_step", spy)
    # no RER and a zero-weight accuracy/format: the plug-in alone decides whether a group is constant
    cfg = tiny_config(tmp_path, reward={"plugins": ["emor3_half_plugin:half_constant=1.0"],
                                        "weights": "accuracy=0,format=0"},
                      grpo={"algo": "dapo", "steps": 2, "prompts_per_step": 4, "mini_batch_prompts": 4,
                            "micro_batch_rows": 8}, sft={"steps": 0})
    train(cfg)
    rows = [json.loads(x) for x in (Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["dapo/filtered_groups"] for r in rows) > 0, "the test needs constant groups to filter"
    for r in rows:
        assert r["dapo/kept_groups"] > 0
        assert r["zero_std_group_frac"] == 0.0, "a group whose rewards are all equal was kept and trained on"
        assert r["advantage_abs_mean"] > 0 and r["kl"] == 0.0 and r["reward/overlong_penalty"] <= 0.0
    assert references and all(ref is None for ref in references), "DAPO (β = 0) must not build a reference model"


def _write_manifest(root: Path, bad: bool) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    rows = []
    for i, label in enumerate(["joy", "fear", "anger", "sadness"]):
        Image.new("RGB", (56, 56), (40 * i, 100, 200)).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "label": label, "taxonomy": "emotion6",
                     "response": f"<step1>a scene</step1><step2>people feel it</step2><step3>so</step3>\\boxed{{{label}}}"})
    if bad:
        rows.append({"image": "missing.png", "label": "joy", "taxonomy": "emotion6"})
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_samples_stop_the_run_or_are_counted(tmp_path, capsys):
    manifest = _write_manifest(tmp_path / "data", bad=True)
    cfg = tiny_config(tmp_path, data={"train": str(manifest)}, grpo={"steps": 1}, sft={"steps": 1})
    with pytest.raises(BadSampleError, match=r"train\.jsonl.*line 5|line 5.*train\.jsonl|missing\.png"):
        train(cfg)
    skip = tiny_config(tmp_path, data={"train": str(manifest), "on_bad_sample": "skip"}, grpo={"steps": 1},
                       sft={"steps": 1})
    train(skip)
    out = capsys.readouterr().out
    assert "SKIPPED 1 bad samples" in out, f"skipped samples must be counted and reported at the start:\n{out}"


def test_config_round_trip(tmp_path):
    cfg = parse_args(["--algo", "gspo", "--grpo.group-size", "4", "--reward.plugins", "a:b=0.5,c:d",
                      "--model.freeze-vision", "true", "--eval.temperature", "0"], "test", "")
    assert cfg.grpo.algo == "gspo" and cfg.reward.plugins == ["a:b=0.5", "c:d"] and cfg.model.freeze_vision
    resolved = cfg.resolved()
    assert resolved.grpo.ratio_level == "sequence" and resolved.grpo.clip_low == 3e-4, "preset numbers are recorded"
    path = tmp_path / "config.toml"
    save_config(resolved, path)
    assert config_from_dict(load_toml(path)) == resolved, "TOML -> dataclass -> saved -> reloaded must be equal"
    assert parse_args(["--config", str(path)], "test", "") == resolved
    with pytest.raises(ValueError, match=r"unknown settings in \[grpo\]: \['group'\]"):
        config_from_dict({"grpo": {"group": 4}})
    with pytest.raises(SystemExit):
        parse_args(["--grpo.group-size", "four"], "test", "")
    # every objective setting is a flag, the DAPO and RER switches included; None keeps the preset's value
    dapo_off = parse_args(["--algo", "dapo", "--grpo.dynamic-sampling", "false", "--grpo.overlong-buffer", "0"],
                          "test", "").algorithm()
    assert (dapo_off.dynamic_sampling, dapo_off.overlong_buffer, dapo_off.clip_high) == (False, 0.0, 0.28)
    assert parse_args(["--grpo.reflection", "false"], "test", "").algorithm().reflection is False
    assert parse_args([], "test", "").algorithm().reflection is True, "emo_r3 is the default and has RER"
    with pytest.raises(SystemExit):
        parse_args(["--eval.every", "5"], "test", "")  # a knob nothing read is gone


def test_examples_parse():
    paths = sorted((REPO / "examples").glob("*.toml"))
    assert len(paths) >= 4
    for path in paths:
        cfg = parse_args(["--config", str(path)], "test", "", check_paths=False)  # paths of the user's machine
        assert cfg == config_from_dict(load_toml(path)).resolved(), \
            f"{path.name}: the flags parser reads the file differently"
        a = cfg.algorithm()  # the preset and overrides resolve to complete settings
        assert all(getattr(a, f) is not None for f in ("clip_low", "clip_high", "kl_coef", "loss_agg", "reflection"))
        assert cfg.resolved().grpo.kl_coef == a.kl_coef


def test_prompt_slice_and_concat_keep_logprobs(tmp_path):
    """Sub-batches (micro-batches, DAPO's kept groups) must score exactly as the rows of the full batch."""
    from emor3.toy.emoscenes import make_emoscenes
    from emor3.toy.model import tokenizer_corpus
    from emor3.data import get_taxonomy
    from emor3.engine.prompts import encode_samples
    from emor3.engine.scoring import completion_logprobs, concat_prompt_batches, prompt_slice
    from emor3.models import Processor
    from emor3.toy.model import build_tiny_checkpoint

    tax = {n: get_taxonomy(n) for n in ("mikels8", "binary")}
    build_tiny_checkpoint(tmp_path / "m", tokenizer_corpus(tax.values()), seed=0, vocab_size=512)
    model, proc = load_pretrained(tmp_path / "m"), Processor.from_pretrained(tmp_path / "m")
    data = make_emoscenes(seed=0, n_train=3, n_test=0, n_ood=2, image_size=84)
    samples = list(data["train"].samples) + list(data["ood_binary"].samples)  # different prompt lengths
    images = [s.open_image() for s in samples]
    full = encode_samples(proc, samples, images, tax)
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 200, (5, 6), generator=g)
    mask = torch.ones(5, 6)
    mask[1, 3:] = 0
    idx = torch.arange(5)
    with torch.no_grad():
        ref = completion_logprobs(model, full, idx, comp, mask)
        part = prompt_slice(full, torch.tensor([1, 4]))
        sub = completion_logprobs(model, part, torch.arange(2), comp[[1, 4]], mask[[1, 4]])
        torch.testing.assert_close(sub, ref[[1, 4]], atol=1e-5, rtol=1e-5)
        both = concat_prompt_batches([prompt_slice(full, torch.tensor([3])), prompt_slice(full, torch.tensor([0, 2]))],
                                     proc.stop_token_ids[0])
        cat = completion_logprobs(model, both, torch.arange(3), comp[[3, 0, 2]], mask[[3, 0, 2]])
        torch.testing.assert_close(cat, ref[[3, 0, 2]], atol=1e-5, rtol=1e-5)


def test_logged_loss_is_the_mini_batch_loss_for_any_micro_batch_size(tmp_path, plugin):
    """1 micro-batch of 4 rows or 2 of 2 rows per mini-batch: the same rollouts and the same gradients, so the same
    logged loss (each micro-batch's loss is its share of the mini-batch's; the shares are summed, not averaged).

    Two mini-batches per step: on-policy, the first update's surrogate is -mean(A) over tokens, 0 when a group's
    completions are equally long (the untrained model never stops), so the logged loss comes from the second update,
    whose ratio differs from 1. Its parameters agree between the two runs up to fp32 summation order (measured
    relative difference 5e-7); a loss averaged instead of summed over micro-batches is off by a factor of 2."""
    logged = {}
    for rows in (4, 2):
        cfg = tiny_config(tmp_path / f"micro{rows}", reward={"plugins": [plugin]},
                          grpo={"steps": 1, "micro_batch_rows": rows, "prompts_per_step": 4, "mini_batch_prompts": 2})
        train(cfg)
        logged[rows] = json.loads((Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()[0])
    one, two = logged[4], logged[2]
    assert one["reward/total"] == two["reward/total"], "the micro-batch size must not change the rollouts"
    assert abs(one["pg_loss"]) > 1e-4, "the comparison is vacuous when the loss is 0"
    for k in ("loss", "pg_loss", "grad_norm"):
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), f"{k} depends on --grpo.micro-batch-rows"



def test_shared_prefix_step_equals_the_unshared_step(tmp_path, plugin):
    """--grpo.shared-prefix on and off: the same rollouts, and the update, the reference pass and the old-log-prob
    recompute give the same numbers up to float rounding. Two mini-batches (so old log-probs are recomputed and the
    second update's ratio differs from 1), micro-batches of one group, the sequence-level ratio (GSPO), β > 0."""
    runs = {}
    for shared in (True, False):
        cfg = tiny_config(tmp_path / f"shared{shared}", reward={"plugins": [plugin]}, sft={"steps": 0},
                          grpo={"steps": 1, "prompts_per_step": 4, "mini_batch_prompts": 2, "micro_batch_rows": 2,
                                "ratio_level": "sequence", "kl_coef": 0.05, "shared_prefix": shared})
        train(cfg)
        out = Path(cfg.run.out)
        runs[shared] = (json.loads((out / "metrics.jsonl").read_text().splitlines()[0]),
                        _params(latest_checkpoint(out) / "model"))
    (m_s, p_s), (m_u, p_u) = runs[True], runs[False]
    assert m_s["reward/total"] == m_u["reward/total"], "the switch must not change the rollouts"
    assert abs(m_u["pg_loss"]) > 1e-4 and m_u["kl"] > 0, "the comparison is vacuous when loss and KL are 0"
    for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "ratio_mean", "ratio_min", "ratio_max", "logp_gap"):
        assert m_s[k] == pytest.approx(m_u[k], rel=1e-5, abs=1e-6), f"{k}: shared {m_s[k]} vs unshared {m_u[k]}"
    # The parameters: AdamW divides each element by its own gradient magnitude, so an element whose gradient is ~0
    # moves by an amount its rounding decides, in either direction. Elementwise, two runs equal up to rounding can
    # therefore differ by both runs' largest moves, 2·lr·Σ_t B_t, where B_t bounds Adam's bias-corrected
    # |m̂_t| / √v̂_t at update t (Cauchy-Schwarz over the t gradients so far); the decoupled weight decay moves both
    # runs alike. The gradients themselves are pinned by grad_norm above and per parameter in
    # tests/test_shared_prefix.py; on average the parameter gap is far smaller (the mean is pinned at 1e-4·lr).
    lr, (b1, b2) = cfg.grpo.lr, (0.9, 0.999)  # torch.optim.AdamW's default betas, which the trainer uses
    updates = cfg.grpo.epochs * cfg.grpo.prompts_per_step // cfg.grpo.mini_batch_prompts
    bound = 2 * lr * sum((1 - b1) / (1 - b1**t) / math.sqrt((1 - b2) / (1 - b2**t))
                         * math.sqrt(sum(b1 ** (2 * (t - i)) / b2 ** (t - i) for i in range(1, t + 1)))
                         for t in range(1, updates + 1))
    init = _params(Path(cfg.run.out) / "init")
    for name, p in p_u.items():
        assert not torch.equal(p, init[name]), f"{name} never moved: the comparison would not cover its gradient"
        gap = (p_s[name] - p).abs()
        assert float(gap.max()) <= bound and float(gap.mean()) <= 1e-4 * lr, \
            f"{name}: shared and unshared parameters differ by up to {float(gap.max()):.1e} (bound {bound:.1e})"


def test_scored_batch_select_and_cat_keep_rows_and_prompts_aligned(tmp_path):
    """DAPO keeps groups (select) from several rollout rounds (cat): every row must stay with its prompt, its
    rewards, its advantage and every Rollout field."""
    from emor3.data import get_taxonomy
    from emor3.toy.emoscenes import make_emoscenes
    from emor3.engine.prompts import encode_samples
    from emor3.engine.sampler import Rollout
    from emor3.toy.model import tokenizer_corpus
    from emor3.grpo.rollout import ScoredBatch
    from emor3.models import Processor
    from emor3.toy.model import build_tiny_checkpoint
    from emor3.rewards import RewardBreakdown

    tax = {n: get_taxonomy(n) for n in ("mikels8", "binary")}
    build_tiny_checkpoint(tmp_path / "m", tokenizer_corpus(tax.values()), seed=0, vocab_size=512)
    proc = Processor.from_pretrained(tmp_path / "m")
    data = make_emoscenes(seed=0, n_train=3, n_test=0, n_ood=1, image_size=84)
    samples = list(data["train"].samples) + list(data["ood_binary"].samples)  # 4 prompts, different lengths
    prompts = encode_samples(proc, samples, [s.open_image() for s in samples], tax)
    B, G, T = 4, 3, 5

    def scored(offset: int, T: int) -> ScoredBatch:
        n = torch.arange(B * G) + offset  # (N,) a row's identity, written into every per-row field
        ids = n[:, None].repeat(1, T)  # (N, T)
        mask = torch.ones(B * G, T)
        rollout = Rollout(prompt_index=torch.arange(B).repeat_interleave(G), completion_ids=ids, completion_mask=mask,
                          logprobs=-n[:, None].float().repeat(1, T), truncated=n % 2 == 0,
                          texts=[f"row{i}" for i in n.tolist()], group_size=G)
        rewards = RewardBreakdown(n.float(), {"accuracy": 2 * n.float()}, {"accuracy": 1.0}, {"format_paper": 3 * n.float()})
        return ScoredBatch(prompts, rollout, rewards, advantages=10 * n.float())

    def check(batch: ScoredBatch, prompt_of: list[int], offset_of: list[int]):
        """batch prompt b must be original prompt prompt_of[b], its rows original rows of that prompt + offset."""
        assert batch.num_prompts == len(prompt_of) and batch.rollout.prompt_index.tolist() == \
            torch.arange(len(prompt_of)).repeat_interleave(G).tolist()
        for b, (p, off) in enumerate(zip(prompt_of, offset_of)):
            real = batch.prompts.attention_mask[b].bool()
            orig = prompts.attention_mask[p].bool()
            assert torch.equal(batch.prompts.input_ids[b][real], prompts.input_ids[p][orig]), "prompt misaligned"
            assert batch.prompts.next_position[b] == prompts.next_position[p]
            for j in range(G):
                r, n = b * G + j, p * G + j + off
                assert batch.rollout.completion_ids[r, 0] == n and batch.rollout.texts[r] == f"row{n}"
                assert batch.rollout.logprobs[r, 0] == -n and batch.rollout.truncated[r] == (n % 2 == 0)
                assert batch.rewards.total[r] == n and batch.rewards.components["accuracy"][r] == 2 * n
                assert batch.rewards.extras["format_paper"][r] == 3 * n and batch.advantages[r] == 10 * n
        assert batch.prompts.pixel_values.shape[0] == sum(
            int(prompts.image_grid_thw[p].prod()) for p in prompt_of), "a prompt's image patches were not kept with it"

    a, b = scored(0, T), scored(100, T + 2)
    check(a.select(torch.tensor([3, 1])), [3, 1], [0, 0])
    both = ScoredBatch.cat([a.select(torch.tensor([2])), b.select(torch.tensor([0, 3]))], pad_token_id=7)
    check(both, [2, 0, 3], [0, 100, 100])
    assert both.rollout.completion_ids.shape == (3 * G, T + 2)
    assert both.rollout.completion_mask[:G, T:].sum() == 0 and (both.rollout.completion_ids[:G, T:] == 7).all(), \
        "the shorter batch's completions are right-padded with the pad id and masked out"
    check(both.select(torch.tensor([2, 0])), [3, 2], [100, 0])
