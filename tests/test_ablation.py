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


def _part(tmp_path: Path, name: str, seeds: list[int], rows: list[dict]) -> Path:
    path = tmp_path / name / "ablation.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"seeds": seeds, "rows": {"shortcut": rows}, "paired": {}, "command": f"run {name}",
                                "wall_s": 60.0 * len(seeds), "threads": 1, "loads": [1.0, 2.0]}))
    return path


def test_merge_reports_every_seed_of_every_part(tmp_path):
    per_seed = [{"Cold-Start SFT": _row(40, 20, 50, 30), "GRPO": _row(50 + s, 22, 45, 35),
                 "EMO-R3": _row(52, 24, 60, 20)} for s in range(3)]
    a = _part(tmp_path, "a", [0, 2], [per_seed[0], per_seed[2]])
    b = _part(tmp_path, "b", [1], [per_seed[1]])
    md = tmp_path / "RESULTS.md"
    md.write_text(f"before\n{ablation.MARK_BEGIN}\nstale table\n{ablation.MARK_END}\nafter\n")
    text = ablation.merge([a, b], md)
    assert "### shortcut (3 seeds)" in text and "Seeds 0,2,1" in text
    # EMO-R3 - GRPO per seed, in the merged order (seeds 0, 2, 1): in-domain 52 - (50 + s)
    assert "| run A^I | 51.0 | 52.0 | +1.0" in text and "| +2.0, +0.0, +1.0 |" in text
    assert "| cue recall | 45.0 | 60.0 | +15.0 [+15.0, +15.0] |" in text
    written = md.read_text()
    assert written.startswith("before\n") and written.endswith("after\n") and "stale table" not in written
    assert text in written
