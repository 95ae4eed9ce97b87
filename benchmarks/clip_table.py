"""The default clip run's table over seeds: Cold-Start SFT and EMO-R3 on EmoScenes clips, from finished runs.

Each run is ``python -m emor3.grpo.train --config examples/emoscenes_clips.toml --seed S``; its results.json holds
both rows (the Cold-Start checkpoint, evaluated before GRPO, and the policy after it). This reads the runs' folders
(or the copies committed under benchmarks/clip_runs/) and prints the method table and the paired EMO-R3 - Cold-Start
differences with ``benchmarks/ablation.py``'s statistics: the mean and the seeds' range below 5 seeds, intervals from
5 on, the sign test always.

    python benchmarks/clip_table.py benchmarks/clip_runs/default-seed0 benchmarks/clip_runs/default-seed1 ...
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import ablation  # benchmarks/ablation.py, beside this script

ROWS = (("Cold-Start SFT", "Cold-Start SFT"), ("EMO-R3", "emo_r3"))  # (table name, results.json row)


def seed_of(run: Path) -> int:
    """The seed a run was trained with, from its config.toml's [run] section."""
    m = re.search(r"^\[run\][^\[]*?^seed = (\d+)$", (run / "config.toml").read_text(), re.M | re.S)
    if not m:
        raise ValueError(f"{run / 'config.toml'}: no [run] seed")
    return int(m.group(1))


def table(runs: list[Path], root: Path = Path(".")) -> str:
    """The report of ``runs`` (folders, read below ``root``; the command shows them as given)."""
    results, seeds = [], []
    for shown in runs:
        run = root / shown
        res = json.loads((run / "results.json").read_text())
        missing = [key for _, key in ROWS if key not in res]
        if missing:
            raise ValueError(f"{run / 'results.json'}: no {', '.join(missing)} row (a finished clip run has both)")
        results.append({name: res[key] for name, key in ROWS})
        seeds.append(seed_of(run))
    text, _ = ablation.report({"clips": results}, {"clips": seeds}, 0.0, "", 0, [0.0],
                              pairs=(("EMO-R3", "Cold-Start SFT"),))
    # ablation's first paragraph describes one ablation process (its threads, load, wall time); these runs ran
    # apart, each with its own time.txt, so the header names only the command and the seeds
    head = f"Command: `python benchmarks/clip_table.py {' '.join(map(str, runs))}`. Seeds: " \
        f"{', '.join(map(str, sorted(seeds)))}."
    return head + "\n\n" + text.split("\n\n", 1)[1]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished clip run folders (results.json, config.toml)")
    text = table(ap.parse_args(argv).runs)
    print(text)
    return text


if __name__ == "__main__":
    main()
