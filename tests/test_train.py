"""The whole run on a tiny model: smoke (every parameter moves), exact resume, SIGTERM checkpoint, bad samples,
config round trip, evaluation arithmetic, and the batch plumbing the loop relies on."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from emor3.config import Config, config_from_dict, dump_toml, load_toml, parse_args, save_config
from emor3.evaluate import format_table, summary_scores
from emor3.grpo.train import train
from emor3.models import load_pretrained

REPO = Path(__file__).resolve().parents[1]

# A run small enough for CI: 2 prompts x 2 samples, 16 new tokens, a handful of eval images.
TINY = {
    "data": {"emoscenes_train": 16, "emoscenes_test": 4, "emoscenes_ood": 2, "cold_start": 4},
    "sft": {"steps": 2, "batch_size": 4},
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
    before, after = _params(out / "init"), _params(out / "checkpoint" / "model")
    frozen = [k for k in before if torch.equal(before[k], after[k])]
    assert not frozen, f"parameters that never moved (no gradient reached them): {frozen}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm"))
        assert r["skipped_updates"] == 0
        assert r["logp_gap"] < 1e-4, "sampler and trainer log-probs must agree in fp32 (same model, same inputs)"
        for key in ("reward/accuracy", "reward/format", "reward/consistency", "reward/coherence",
                    "reward/length_reward", "accuracy", "format_rate", "clip_frac_low", "clip_frac_high",
                    "clip_frac_dual", "ratio_min", "ratio_max", "zero_std_group_frac", "truncation_rate",
                    "completion_len_mean", "time/rollout", "time/judge", "time/reference", "time/update",
                    "tokens_per_s", "peak_memory_mb"):
            assert key in r, f"metrics.jsonl lacks {key}"
    assert rows[0]["ratio_mean"] == pytest.approx(1.0), "on-policy first update: the ratio is exactly 1"
    assert (out / "samples.jsonl").read_text().strip(), "sample completions are written every sample_every steps"
    assert "initial" in results and "emo_r3" in results, "the table has the starting point and the trained policy"
    assert (out / "results.md").read_text().count("|") > 10


def test_a_new_run_in_an_old_folder_starts_clean(tmp_path, capsys):
    cfg = tiny_config(tmp_path, grpo={"steps": 1}, sft={"steps": 0})
    train(cfg)
    train(cfg)  # not --resume: the folder's earlier run is replaced, not appended to
    rows = (Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1, "a fresh run must not append its metrics to an earlier run's"
    assert "holds an earlier run" in capsys.readouterr().out


def test_resume_is_bit_exact(tmp_path, plugin):
    full = tiny_config(tmp_path / "a", reward={"plugins": [plugin]}, grpo={"steps": 2})
    train(full)
    half = tiny_config(tmp_path / "b", reward={"plugins": [plugin]}, grpo={"steps": 1})
    train(half)
    out_b = Path(half.run.out)
    # continue the stopped run for one more step: --resume RUN_DIR reads the run's own config, flags override it
    resumed = parse_args(["--resume", str(out_b), "--grpo.steps", "2"], "test", "")
    assert resumed.run.out == str(out_b) and resumed.grpo.group_size == 2
    train(resumed)
    a, b = _params(Path(full.run.out) / "checkpoint" / "model"), _params(out_b / "checkpoint" / "model")
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
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.5)
    assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"SIGTERM must end the run cleanly, got {proc.returncode}:\n{output}"
    assert "SIGTERM" in output and "--resume" in output
    state = torch.load(Path(cfg.run.out) / "checkpoint" / "trainer_state.pt", weights_only=True)
    steps_logged = len(metrics.read_text().splitlines())
    assert state["step"] == steps_logged >= 1, "the checkpoint holds the last finished step"


def test_dapo_dynamic_sampling_runs_and_reports(tmp_path, plugin):
    cfg = tiny_config(tmp_path, reward={"plugins": [plugin]}, grpo={"algo": "dapo", "steps": 1},
                      sft={"steps": 0})
    train(cfg)
    row = json.loads((Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()[0])
    assert {"dapo/filtered_groups", "dapo/refill_rounds", "dapo/kept_groups"} <= set(row)
    assert row["kl"] == 0.0, "DAPO has no KL term"
    assert "reward/overlong_penalty" in row


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
    with pytest.raises(Exception, match=r"train\.jsonl.*line 5|line 5.*train\.jsonl|missing\.png"):
        train(cfg)
    skip = tiny_config(tmp_path, data={"train": str(manifest), "on_bad_sample": "skip"}, grpo={"steps": 1},
                       sft={"steps": 1})
    train(skip)
    out = capsys.readouterr().out
    assert "skipped" in out.lower() and "1" in out, "skipped samples must be counted and reported at the start"


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


def test_examples_parse():
    for path in sorted((REPO / "examples").glob("*.toml")):
        cfg = parse_args(["--config", str(path)], "test", "")
        cfg.algorithm()  # the preset and overrides resolve


def test_evaluation_table_arithmetic():
    sets = {"emoset": {"domain": "in", "accuracy": 70.0, "format_rate": 100.0, "cue_rate": None},
            "emotion6": {"domain": "out", "accuracy": 50.0, "format_rate": 90.0, "cue_rate": None},
            "webemo": {"domain": "out", "accuracy": 40.0, "format_rate": 80.0, "cue_rate": 25.0}}
    s = summary_scores(sets)
    assert s == {"A^I": 70.0, "A^O": 45.0, "A": pytest.approx(160 / 3)}
    table = format_table({"GRPO": {"sets": sets, **s}})
    assert "| GRPO | 70.00 | 50.00 | 40.00 | 70.00 | 45.00 | 53.33 | 90.00 | 25.00 |" in table
    assert "emoset^I" in table and "emotion6 |" in table


def test_prompt_slice_and_concat_keep_logprobs(tmp_path):
    """Sub-batches (micro-batches, DAPO's kept groups) must score exactly as the rows of the full batch."""
    from emor3.data.emoscenes import make_emoscenes
    from emor3.experiment import tokenizer_corpus
    from emor3.data import get_taxonomy
    from emor3.grpo.rollout import completion_logprobs, concat_prompt_batches, encode_samples, prompt_slice
    from emor3.models import Processor
    from emor3.models.tiny import build_tiny_checkpoint

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
