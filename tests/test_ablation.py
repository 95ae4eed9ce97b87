"""benchmarks/ablation.py: seeds run in separate processes merge into the report one process would write."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import ablation  # noqa: E402


def _row(acc_in: float, acc_out: float, recall: float, halluc: float) -> dict:
    sets = {"test": {"accuracy": acc_in, "n": 400, "format_rate": 99.0, "cue_recall": recall, "hallucinated": halluc},
            "ood_render": {"accuracy": acc_out, "n": 200, "format_rate": 90.0, "cue_recall": recall,
                           "hallucinated": halluc}}
    return {"sets": sets, "run A^I": acc_in, "run A^O": acc_out, "run A": (acc_in + acc_out) / 2}


def _methods() -> dict:
    """One seed's rows: Cold-Start SFT, GRPO and EMO-R3."""
    return {"Cold-Start SFT": _row(40, 20, 50, 30), "GRPO": _row(50, 22, 45, 35), "EMO-R3": _row(52, 24, 60, 20)}


def _part(tmp_path: Path, name: str, seeds: list[int], rows: list[dict], bench: str = "shortcut",
          started: float | None = None) -> Path:
    path = tmp_path / name / "ablation.json"
    path.parent.mkdir()
    part = {"seeds": seeds, "rows": {bench: rows}, "paired": {}, "command": f"run {name}",
            "wall_s": 60.0 * len(seeds), "threads": 1, "loads": [1.0, 2.0]}
    if started is not None:
        part.update(started=started, ended=started + part["wall_s"])
    path.write_text(json.dumps(part))
    return path


def test_merge_reports_every_seed_of_every_part(tmp_path):
    per_seed = [{"Cold-Start SFT": _row(40, 20, 50, 30), "GRPO": _row(50 + s, 22, 45, 35),
                 "EMO-R3": _row(52, 24, 60, 20)} for s in range(3)]
    a = _part(tmp_path, "a", [0, 2], [per_seed[0], per_seed[2]])
    b = _part(tmp_path, "b", [1], [per_seed[1]])
    md = tmp_path / "RESULTS.md"
    md.write_text(f"before\n{ablation.MARK_BEGIN}\nstale table\n{ablation.MARK_END}\nafter\n")
    text = ablation.merge([a, b], md)
    assert "### shortcut (3 seeds)" in text and "Seeds: shortcut 0,2,1;" in text
    # EMO-R3 - GRPO per seed, in the merged order (seeds 0, 2, 1): in-domain 52 - (50 + s)
    assert "| run A^I | 51.0 | 52.0 | +1.0" in text and "| +2.0, +0.0, +1.0 |" in text
    assert "| cue recall | 45.0 | 60.0 | +15.0 [+15.0, +15.0] |" in text
    written = md.read_text()
    assert written.startswith("before\n") and written.endswith("after\n") and "stale table" not in written
    assert text in written


def test_merge_keeps_each_benchmarks_seeds_and_the_whole_wall_time(tmp_path):
    """Parts that ran one benchmark each, one after another: each table names its own seeds, and the wall time runs
    from the first start to the last end (here 0-5 min), not the longest part's."""
    a = _part(tmp_path, "a", [0, 1, 2], [_methods()] * 3, "shortcut", started=1000.0)  # 1000-1180 s
    b = _part(tmp_path, "b", [3, 4], [_methods()] * 2, "default", started=1180.0)  # 1180-1300 s
    text = ablation.merge([a, b], None)
    assert "Seeds: shortcut 0,1,2; default 3,4;" in text
    assert "### shortcut (3 seeds)" in text and "### default (2 seeds)" in text
    assert "wall time 5 min (5 process-minutes)" in text


def test_an_empty_results_md_writes_nowhere(tmp_path, monkeypatch, capsys):
    """--results-md "" (the form the docstring gives for parts run side by side) prints the report and writes no
    file: an empty path must not become the working folder."""
    a = _part(tmp_path, "a", [0], [_methods()])
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    ablation.main(["--merge", str(a), "--results-md", ""])
    assert "### shortcut (1 seeds)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_jobs_deal_the_seeds_in_turn():
    assert ablation.deal([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert ablation.deal([0, 1, 2], 3) == [[0], [1], [2]]
    assert ablation.deal([7], 4) == [[7]]


def test_jobs_a_failing_part_stops_the_ablation_and_names_its_log(tmp_path):
    """Each part runs in its own process with its own folder and log; a part whose runs fail (here: a flag the
    runs do not know) ends the ablation with its log's path, and nothing is merged into RESULTS.md."""
    md = tmp_path / "RESULTS.md"
    md.write_text("untouched\n")
    try:
        ablation.main(["--jobs", "2", "--seeds", "0,1", "--benchmarks", "shortcut", "--out", str(tmp_path / "abl"),
                       "--results-md", str(md), "--extra", "--no-such-flag", "1"])
    except SystemExit as e:
        message = str(e)
    else:
        raise AssertionError("the ablation went on after its parts failed")
    for k in (0, 1):
        log = tmp_path / "abl" / f"part{k}" / "log.txt"
        assert str(log) in message and "no-such-flag" in log.read_text()
    assert md.read_text() == "untouched\n"
