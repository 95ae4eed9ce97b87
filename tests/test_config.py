"""The configuration a user gives: every flag checked at parse time (exit 2 naming it), every choice declared once,
and ``emor3.config`` importable without torch."""

from __future__ import annotations

import math
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Literal

import pytest

from emor3 import config as C

ROOT = Path(__file__).resolve().parents[1]

# Settings whose value is a path that must exist: their bad value is a missing file
# (test_a_missing_input_is_a_usage_error_naming_its_flag).
PATHS = {("model", "path"), ("data", "train"), ("data", "taxonomy")}
# A bad value for each setting that is neither a choice, a bool nor a number.
TEXT = {
    ("model", "device"): "gpu",
    ("model", "lora_targets"): "q_proj,bogus_proj",
    ("data", "eval"): ["=nameless.jsonl", "a=x.jsonl,a=y.jsonl"],
    ("data", "cache_dir"): " ",
    ("sft", "instruct_cache"): " ",
    ("reward", "weights"): ["accuracy=heavy", "accuracy=inf", "accuracy=nan", "bogus"],
    ("reward", "plugins"): ["no_colon", "pkg.mod:fn=inf"],
    ("run", "out"): " ",
    ("run", "resume"): "/nonexistent/emor3-run",
}


def _flag(sec: str, name: str) -> str:
    return f"--{sec}.{name.replace('_', '-')}"


def _bad_values(sec: str, name: str) -> list[str]:
    """Values of ``sec.name`` that no run can use."""
    t, _ = C._field_type(C.SECTIONS[sec], name)
    if (sec, name) in TEXT:
        return TEXT[sec, name] if isinstance(TEXT[sec, name], list) else [TEXT[sec, name]]
    if typing.get_origin(t) is Literal:
        return ["bogus"]
    if t is bool:
        return ["maybe"]
    rng = C._RANGES.get((sec, name))
    if t is float:
        return ["nan", "inf", "-inf"] + ([str(rng[0] - 1)] if rng and rng[0] is not None else [])
    if t is int:
        if rng and rng[0] is not None:
            return [str(rng[0] - 1), "1.5"]
        if rng and rng[2] is not None:
            return [str(rng[2] + 1), "1.5"]
        return ["1.5"]
    raise AssertionError(f"{sec}.{name}: no bad value known for type {t}; add one to TEXT")


CASES = [(sec, f.name, v) for sec, cls in C.SECTIONS.items() for f in fields(cls)
         if (sec, f.name) not in PATHS for v in _bad_values(sec, f.name)]


@pytest.mark.parametrize("sec, name, value", CASES, ids=[f"{s}.{n}={v}" for s, n, v in CASES])
def test_every_setting_with_a_bad_value_is_a_usage_error_naming_its_flag(sec, name, value, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_args([_flag(sec, name), value], "python -m emor3.grpo.train", "")
    err = capsys.readouterr().err
    assert e.value.code == 2, f"{_flag(sec, name)} {value!r} must be an argparse usage error (exit 2)"
    assert _flag(sec, name) in err, f"the error must name {_flag(sec, name)}: {err.strip().splitlines()[-1]}"


def test_every_field_is_walked():
    walked = {(s, n) for s, n, _ in CASES} | PATHS
    every = {(sec, f.name) for sec, cls in C.SECTIONS.items() for f in fields(cls)}
    assert walked == every, f"settings without a bad-value case: {sorted(every - walked)}"


def test_a_bad_value_in_a_config_file_names_the_flag_and_the_file(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('[grpo]\ncompile = "bogus"\n[eval]\ntemperature = nan\n')
    with pytest.raises(SystemExit) as e:
        C.parse_args(["--config", str(path)], "python -m emor3.grpo.train", "")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--grpo.compile" in err and str(path) in err


def test_the_default_and_the_examples_parse_to_resolved_configs():
    for argv in ([], ["--config", str(ROOT / "examples" / "quick.toml")],
                 ["--config", str(ROOT / "examples" / "emoset_qwen2_5_vl_3b.toml")]):
        # the 3B recipe names a checkpoint and datasets of the user's machine: its values are checked, not its paths
        cfg = C.parse_args(argv, "python -m emor3.grpo.train", "", check_paths=False)
        assert cfg.resolved() == cfg, f"{argv}: parsing must resolve every auto"
        assert "auto" not in (cfg.grpo.loss_scope, cfg.reward.missing_step) and cfg.reward.judge_max_new_tokens > 0
        assert all(getattr(cfg.grpo, f.name) is not None for f in fields(C.Algorithm)), "the preset is written in"


def test_examples_default_toml_is_the_embedded_default():
    """examples/default.toml says it is what `python -m emor3.grpo.train` runs with no arguments: every value it
    writes out equals the default, and so does the config it parses to."""
    written = C.parse_args(["--config", str(ROOT / "examples" / "default.toml")], "python -m emor3.grpo.train", "")
    assert written == C.parse_args([], "python -m emor3.grpo.train", "")


def test_dispatchers_read_the_config_declarations():
    """One source for each choice: the names the math, the rewards and the launcher accept are the config's."""
    import torch

    from emor3 import distributed
    from emor3.data.dataset import ON_BAD_SAMPLE
    from emor3.toy.emoscenes import EVAL_SPLITS, VARIANTS
    from emor3.grpo import objective
    from emor3.models.sizes import NAMED, NAMED_QWEN3
    from emor3.rewards.combine import ALL_NAN_POLICIES, WEIGHT_PRESETS
    from emor3.rewards.reflection import MISSING_RULES, MODES

    assert objective.KL_KINDS == C.choices(C.KLKind) and objective.AGG_MODES == C.choices(C.LossAgg)
    assert objective.ADVANTAGE_SCALES == C.choices(C.AdvScale) and objective.RATIO_LEVELS == C.choices(C.RatioLevel)
    assert distributed.PARALLEL == C.choices(C.Parallel) and distributed.REFERENCE == C.choices(C.ReferenceMode)
    assert tuple(MISSING_RULES) == C.choices(C.MissingStep) and MODES == C.choices(C.JudgeMode)
    assert ALL_NAN_POLICIES == C.choices(C.PluginAllNaN) and ON_BAD_SAMPLE == C.choices(C.OnBadSample)
    assert VARIANTS == C.choices(C.EmoScenesVariant) and set(C.ALGORITHMS) == set(C.choices(C.AlgoName))
    assert EVAL_SPLITS == C.choices(C.EmoScenesEval) and tuple(WEIGHT_PRESETS) == C.choices(C.WeightPreset)
    assert set(NAMED) | set(NAMED_QWEN3) == set(C.choices(C.ModelSize))
    logp = torch.zeros(1, 3)  # (N, T)
    for name in C.choices(C.KLKind):  # every declared name runs, not only parses
        assert math.isfinite(float(objective.kl_penalty(logp, logp, kind=name).sum()))
    for name in C.choices(C.LossAgg):
        assert math.isfinite(float(objective.aggregate(logp, torch.ones(1, 3), mode=name)))


def test_importing_the_config_does_not_import_torch():
    code = "import emor3.config, sys; assert 'torch' not in sys.modules, 'emor3.config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=None)


@pytest.mark.parametrize("flags, named", [
    (["--model.path", "{tmp}/nowhere"], "--model.path"),
    (["--model.path", "{tmp}"], "--model.path"),  # a folder without config.json
    (["--data.train", "{tmp}/missing.jsonl"], "--data.train"),
    (["--data.train", "{tmp}/missing@train"], "--data.train"),
    (["--data.taxonomy", "{tmp}/missing.toml"], "--data.taxonomy"),
    (["--data.eval", "mine={tmp}/missing.jsonl@in"], "--data.eval"),
    (["--data.eval", "mine={tmp}/there.jsonl:{tmp}/missing.toml"], "--data.eval"),
])
def test_a_missing_input_is_a_usage_error_naming_its_flag(flags, named, tmp_path, capsys):
    (tmp_path / "there.jsonl").write_text("")
    argv = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as e:
        C.parse_args(argv, "test", "")
    err = capsys.readouterr().err
    assert e.value.code == 2 and named in err and str(tmp_path) in err, err


def test_inputs_that_exist_parse(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "set").mkdir()
    (tmp_path / "tax.toml").write_text("")
    cfg = C.parse_args(["--model.path", str(tmp_path / "model"), "--data.train", f"{tmp_path / 'set'}@train",
                        "--data.taxonomy", str(tmp_path / "tax.toml"),
                        "--data.eval", f"mine={tmp_path / 'set'}:binary@in"], "test", "")
    assert cfg.model.path == str(tmp_path / "model") and cfg.data.train == f"{tmp_path / 'set'}@train"


def test_a_dry_run_needs_only_the_models_config(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = C.parse_args(["--dry-run", "--model.path", str(tmp_path / "model"), "--data.train", "/not/here.jsonl"],
                       "test", "")
    assert cfg.run.dry_run and cfg.data.train == "/not/here.jsonl", "the plan reads no data"
    with pytest.raises(SystemExit):
        C.parse_args(["--dry-run", "--model.path", str(tmp_path / "nowhere")], "test", "")
    assert "--model.path" in capsys.readouterr().err
