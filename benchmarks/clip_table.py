"""The default clip run's table over seeds: Cold-Start SFT and EMO-R3 on EmoScenes clips, from finished runs.

Each run is ``python -m emor3.grpo.train --config examples/emoscenes_clips.toml --seed S``; its results.json holds
both rows (the Cold-Start checkpoint, evaluated before GRPO, and the policy after it). This reads the runs' folders
(or the copies committed under benchmarks/clip_runs/) and prints the method table and the paired EMO-R3 - Cold-Start
differences with ``benchmarks/ablation.py``'s statistics: the mean and the seeds' range below 5 seeds, intervals from
5 on, the sign test always.

Where every run folder also holds the single-frame control of its two checkpoints (``control_sft.json`` and
``control_emo_r3.json``, written by ``benchmarks/clip_control.py --out``), a second table gives, per method, the
accuracy and the changed-cue rate on the whole clips and on the same clips holding their first or last frame, and the
paired difference whole clip - one frame of the changed-cue rate over seeds.

    python benchmarks/clip_table.py benchmarks/clip_runs/default-seed0 benchmarks/clip_runs/default-seed1 ...
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import ablation  # benchmarks/ablation.py, beside this script

ROWS = (("Cold-Start SFT", "Cold-Start SFT"), ("EMO-R3", "emo_r3"))  # (table name, results.json row)
CONTROLS = (("Cold-Start SFT", "control_sft.json"), ("EMO-R3", "control_emo_r3.json"))  # (table name, file)
CONTROL_SETS = (("whole clip", "test"), ("first frame only", "test_first"), ("last frame only", "test_last"))
CUES = ("face", "sky", "object")


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
    text, _ = ablation.tables({"clips": results}, {"clips": seeds}, pairs=(("EMO-R3", "Cold-Start SFT"),))
    head = f"Command: `python benchmarks/clip_table.py {' '.join(map(str, runs))}`. Seeds: " \
        f"{', '.join(map(str, sorted(seeds)))}."
    parts = [head, text]
    have = [[(root / shown / name).is_file() for _, name in CONTROLS] for shown in runs]
    if any(map(any, have)):
        if not all(map(all, have)):
            missing = [str(shown / name) for shown, h in zip(runs, have) for (_, name), ok in zip(CONTROLS, h)
                       if not ok]
            raise ValueError(f"the single-frame control is missing for some runs: {', '.join(missing)}")
        order = sorted(range(len(runs)), key=lambda i: seeds[i])
        parts.append(control_table([root / runs[i] for i in order]))
    return "\n\n".join(parts)


def control_table(runs: list[Path]) -> str:
    """The single-frame control over seeds (runs in seed order): per method and set, the accuracy and the share of
    answers right about the cue that changed (all clips, and per changed cue), then whole clip - one frame."""
    ctl = {name: [json.loads((run / file).read_text())["sets"] for run in runs] for name, file in CONTROLS}
    n = {s[key]["all"]["n"] for per in ctl.values() for s in per for _, key in CONTROL_SETS}
    lines = [f"### Single-frame control ({len(runs)} seeds, {'/'.join(map(str, sorted(n)))} test clips per set)", "",
             "Each checkpoint answers the test clips and the same clips holding their first or last frame, where the "
             "changed cue is neutral (`benchmarks/clip_control.py`). \"Changed cue right\": the label has the right "
             "valence (face), arousal (sky) or family (object) for the cue that changed; a guess is right on 50 %.",
             "", "| Method | set | accuracy % | changed cue right % | " + " | ".join(f"{c} %" for c in CUES) + " |",
             "|---|---|---|---|" + "---|" * len(CUES)]
    for name, per in ctl.items():
        for label, key in CONTROL_SETS:
            cells = [ablation.mean_ci([s[key]["all"][m] for s in per]) for m in ("accuracy", "changed_cue")]
            cells += [ablation.mean_ci([s[key][c]["changed_cue"] for s in per if c in s[key]]) for c in CUES]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "Paired over seeds: changed cue right %, whole clip - one frame.", "",
              "| Method | one frame | whole clip - one frame | bootstrap 95 % | t 95 % | sign test | per seed |",
              "|---|---|---|---|---|---|---|"]
    for name, per in ctl.items():
        whole = [s["test"]["all"]["changed_cue"] for s in per]
        for label, key in CONTROL_SETS[1:]:
            st = ablation.paired_stats(whole, [s[key]["all"]["changed_cue"] for s in per])
            lines.append(f"| {name} | {label} | {st['diff']:+.1f} | " + " | ".join(ablation.paired_cells(st)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished clip run folders (results.json, config.toml)")
    text = table(ap.parse_args(argv).runs)
    print(text)
    return text


if __name__ == "__main__":
    main()
