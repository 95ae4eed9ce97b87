"""benchmarks/selection.py: the choice rules, the validation-only guard and the record's tables (no training here;
the whole script runs in about a minute with `--extra --config examples/quick.toml`)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import selection  # noqa: E402


def test_choose_the_best_mean_and_the_smaller_value_on_a_tie():
    scores = {100: [40.0, 44.0], 200: [50.0, 46.0], 300: [49.0, 47.0], 500: [30.0, 30.0]}
    assert selection.choose([100, 200, 300, 500], scores) == 200, "means 42, 48, 48, 30: the earlier of the tie"
    assert selection.choose(["1e-4", "3e-4"], {"1e-4": [10.0], "3e-4": [12.0]}) == "3e-4"
    assert selection.choose([1, 2], {2: [5.0]}) == 2, "a grid value without scores is not chosen"
    with pytest.raises(ValueError):
        selection.choose([1], {})


def test_a_run_that_read_anything_but_validation_is_refused():
    ok = {"sft": {"sets": {"validation": {"accuracy": 61.5}}}}
    assert selection.validation_accuracy(ok, "sft") == 61.5
    leaked = {"sft": {"sets": {"validation": {"accuracy": 61.5}, "test": {"accuracy": 60.0}}}}
    with pytest.raises(RuntimeError, match="validation only"):
        selection.validation_accuracy(leaked, "sft")
    assert selection.SELECT == ["--data.emoscenes-eval", "validation"]


def test_the_record_reports_the_curve_the_grid_and_the_choices(tmp_path):
    rec = {"command": "python benchmarks/selection.py", "seeds": [100, 101], "sft_steps": [100, 200],
           "lrs": ["1e-4", "3e-4"], "grpo_steps": 150,
           "sft": {"100": {"100": 40.0, "101": 44.0}, "200": {"100": 50.0, "101": 46.0}}, "sft_choice": 200,
           "grpo": {"grpo": {"1e-4": {"100": 60.0, "101": 64.0}, "3e-4": {"100": 70.0}}}, "lr_choice": {"grpo": "3e-4"}}
    text = selection.report(rec)
    assert "| 100 | 40.00 | 44.00 | 42.00 (range 40.00 to 44.00) |" in text
    assert "Chosen: 200 Cold-Start steps." in text
    assert "| grpo | 62.00 (range 60.00 to 64.00) | 70.00 | 3e-4 |" in text
    md = tmp_path / "RESULTS.md"
    md.write_text("head\n")
    selection.write_results_md(md, text)
    selection.write_results_md(md, text)
    assert md.read_text().count(selection.MARK_BEGIN) == 1 and md.read_text().startswith("head\n")
