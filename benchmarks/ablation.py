"""The paper's comparison at toy scale, and RER's effect where an outcome reward can be satisfied without grounding.

Two benchmarks, the same seeds (default 0-4):
1. ``default`` (EmoScenes as ``make train`` draws it): per seed, the EMO-R3 run builds the tiny model and its
   instruct stage (the zero-shot row, as the paper's zero-shot row is the instruct checkpoint), runs Cold-Start SFT
   (the SFT row) and GRPO with SET + RER; GRPO and DAPO then start from the same Cold-Start checkpoint with the
   same data, steps and batch sizes, so the rows differ only in the algorithm.
2. ``shortcut`` (``--data.emoscenes-variant shortcut``: a badge whose colour gives the label in train and test only,
   independent of the scene out of domain): per seed, EMO-R3 as above, then ``--algo grpo`` from its Cold-Start
   checkpoint. Outcome-only GRPO can reach ~90 % training accuracy from the badge alone; the question is whether
   RER's consistency reward keeps step 1 naming the true cues and the policy answering from them.

For each benchmark: every method's columns as the mean over seeds with a bootstrap 95 % interval over seeds, and
EMO-R3 minus GRPO as paired differences (same seed, same Cold-Start checkpoint) with a paired-bootstrap 95 %
interval (``emor3.evaluate.paired_bootstrap``) for in-domain accuracy, out-of-domain accuracy, cue recall, the
hallucinated-cue rate and the SET format rate (both reward the format alike; RER adds its two judge rewards).
Printed whatever the outcome; written to runs/ablation/ablation.{md,json} after every seed (a stopped ablation keeps
what it finished) and, at the end, into benchmarks/RESULTS.md between the ``<!-- ablation:begin -->`` /
``<!-- ablation:end -->`` markers with the command, machine, load and wall time.

    python benchmarks/ablation.py                                   # 5 seeds, both benchmarks, default settings
    python benchmarks/ablation.py --jobs 2                          # the same in 2 processes, 1 thread each (make ablation)
    python benchmarks/ablation.py --seeds 0,1 --benchmarks shortcut --extra --grpo.steps 10   # quicker
    python benchmarks/ablation.py --seeds 0,2,4 --out runs/abl-a --results-md "" &      # parts by hand,
    python benchmarks/ablation.py --seeds 1,3 --out runs/abl-b --results-md "" ; wait   # then one report:
    python benchmarks/ablation.py --merge runs/abl-a/ablation.json runs/abl-b/ablation.json

``--jobs N`` deals the seeds out to N processes in turn (seeds 0,2,4 and 1,3 for two), each at one torch thread
(``--run.threads 1`` before ``--extra``) with its own folder ``OUT/part<k>`` and log ``OUT/part<k>/log.txt``, then
merges their ablation.json as ``--merge`` does. Every run seeds itself and builds its model from the checkpoint
folders, so which process runs a seed does not enter it; the thread count does (README, "Determinism").

Cost, measured on a 2-core CPU with two processes at one thread each (benchmarks/RESULTS.md, "ablation"): a
``shortcut`` seed (EMO-R3 with its Cold-Start SFT, then GRPO) took about 26 min, a ``default`` seed (EMO-R3, the
zero-shot evaluation, GRPO, DAPO) about 38 min; the whole ablation, 5 seeds x (3 runs on ``default`` + 2 on
``shortcut``) = 25 runs, about 5.3 process-hours: about 2.7 hours with ``--jobs 2`` there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from emor3.config import parse_args
from emor3.evaluate import RUN_AVERAGES, evaluate, paired_bootstrap
from emor3.experiment import build_experiment, prepare_run_dir
from emor3.grpo.train import train

COLUMNS = RUN_AVERAGES  # each seed's run averages (one training setting; not the paper's two-setting A^I / A^O / A)
PAIRED = ("run A^I", "run A^O", "cue recall", "hallucinated", "format")  # the paired EMO-R3 - GRPO differences
MARK_BEGIN, MARK_END = "<!-- ablation:begin -->", "<!-- ablation:end -->"


def _train(algo: str, seed: int, out: Path, extra: list[str], *more: str) -> dict:
    return train(parse_args(["--algo", algo, "--seed", str(seed), "--out", str(out), "--run.progress", "false",
                             "--overwrite", *more, *extra], "ablation", ""))


def run_seed(seed: int, out: Path, benchmark: str, extra: list[str]) -> dict[str, dict]:
    """Every method's evaluation rows for one seed of one benchmark."""
    rows: dict[str, dict] = {}
    base = out / benchmark / f"seed{seed}"
    variant = ["--data.emoscenes-variant", benchmark]
    emo = base / "emo_r3"
    res = _train("emo_r3", seed, emo, extra, *variant)
    # started from EMO-R3's Cold-Start checkpoint by path, GRPO and DAPO keep the tiny run's loss normaliser (a
    # --model.path run would take the release's; docs/method.md, "Where the paper is silent")
    from_sft = ("--model.path", str(emo / "sft"), "--sft.steps", "0", "--grpo.loss-scope", "mini-batch", *variant)
    if benchmark == "default":
        # zero-shot: the model the run started from (the tiny model's instruct stage, else its random init),
        # evaluated the same way
        start = emo / "instruct" if (emo / "instruct" / "config.json").is_file() else emo / "init"
        cfg = parse_args(["--seed", str(seed), "--out", str(base / "zero_shot"), "--model.path", str(start),
                          "--run.progress", "false", "--overwrite", *variant, *extra], "ablation", "")
        exp = build_experiment(cfg, prepare_run_dir(cfg, "ablation"))
        rows["Zero-shot"] = evaluate(exp.model, exp.processor, exp.eval_sets, exp.taxonomies, cfg.eval, seed=seed,
                                     device=exp.device, progress=False)
    rows["Cold-Start SFT"] = res["Cold-Start SFT"]
    for algo in ("grpo", "dapo") if benchmark == "default" else ("grpo",):
        rows[algo.upper()] = _train(algo, seed, base / algo, extra, *from_sft)[algo]
    rows["EMO-R3"] = res["emo_r3"]
    return rows


def metrics(row: dict) -> dict[str, float | None]:
    """The summary numbers of one evaluated row: A^I, A^O, A, format, cue recall and hallucinated-cue rate (means
    over the sets that carry them)."""
    sets = row["sets"].values()

    def mean(key):
        xs = [v[key] for v in sets if v.get(key) is not None]
        return statistics.mean(xs) if xs else None

    return {**{c: row[c] for c in COLUMNS}, "format": mean("format_rate"), "cue recall": mean("cue_recall"),
            "hallucinated": mean("hallucinated")}


def _mean_ci(values: list[float]) -> str:
    """Mean over seeds [bootstrap 95 % interval over seeds]."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    m, lo, hi = paired_bootstrap(values, [0.0] * len(values))
    return f"{m:.1f} [{lo:.1f}, {hi:.1f}]"


def method_table(per_seed: list[dict[str, dict]]) -> str:
    names = list(per_seed[0])
    sets = list(per_seed[0][names[0]]["sets"])
    extra = ("format", "cue recall", "hallucinated")
    lines = ["| Method | " + " | ".join(sets + list(COLUMNS)) + " | format % | cue recall % | hallucinated cues % |",
             "|---" * (len(sets) + len(COLUMNS) + len(extra) + 1) + "|"]
    for name in names:
        runs = [s[name] for s in per_seed]
        cells = [_mean_ci([r["sets"][k]["accuracy"] for r in runs]) for k in sets]
        cells += [_mean_ci([metrics(r)[c] for r in runs]) for c in COLUMNS + extra]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(per_seed: list[dict[str, dict]]) -> tuple[str, dict]:
    """EMO-R3 minus GRPO per seed, the mean difference and its paired-bootstrap 95 % interval."""
    lines = ["| metric | GRPO | EMO-R3 | EMO-R3 - GRPO [95 % CI] | per seed |", "|---|---|---|---|---|"]
    out = {}
    for key in PAIRED:
        pairs = [(metrics(s["EMO-R3"])[key], metrics(s["GRPO"])[key]) for s in per_seed]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not pairs:
            continue
        a, b = [p[0] for p in pairs], [p[1] for p in pairs]
        m, lo, hi = paired_bootstrap(a, b)
        out[key] = {"diff": m, "ci": [lo, hi], "emo_r3": a, "grpo": b}
        per = ", ".join(f"{x - y:+.1f}" for x, y in pairs)
        lines.append(f"| {key} | {statistics.mean(b):.1f} | {statistics.mean(a):.1f} | {m:+.1f} [{lo:+.1f}, {hi:+.1f}] "
                     f"| {per} |")
    return "\n".join(lines), out


def report(results: dict[str, list], seeds: dict[str, list[int]], wall: float, command: str, threads: int,
           loads: list[float], compute: float | None = None) -> tuple[str, dict]:
    """The tables of every benchmark; ``seeds[bench]`` names the seed of each of ``results[bench]``'s rows, ``wall``
    is the time from the first run's start to the last one's end and ``compute`` the sum of the processes' wall
    times (when they ran side by side)."""
    done = "; ".join(f"{b} {','.join(map(str, seeds[b]))}" for b in results if results[b])
    spent = f"wall time {wall / 60:.0f} min" + (f" ({compute / 60:.0f} process-minutes)" if compute else "")
    parts = [f"Command: `{command}`. Seeds: {done}; torch threads {threads}; {os.cpu_count()} CPUs "
             f"({platform.processor() or platform.machine()}); load average (1 min) {min(loads):.1f}-{max(loads):.1f}"
             f" during the run; {spent}; {datetime.date.today().isoformat()}.",
             "Cells: mean over seeds [bootstrap 95 % interval over seeds]. Paired rows: EMO-R3 and GRPO start from "
             "the same Cold-Start checkpoint of each seed; per seed in the order of the seeds above."]
    paired = {}
    for bench, per_seed in results.items():
        if not per_seed:
            continue
        parts.append(f"### {bench} ({len(per_seed)} seeds)\n\n" + method_table(per_seed))
        table, paired[bench] = paired_table(per_seed)
        parts.append(f"Paired, {bench}:\n\n" + table)
    return "\n\n".join(parts), paired


def write_results_md(path: Path, text: str) -> None:
    """Replace the ablation section of RESULTS.md (between the markers), or append one."""
    old = path.read_text() if path.is_file() else ""
    block = f"{MARK_BEGIN}\n## ablation: benchmarks/ablation.py (its own output)\n\n{text}\n{MARK_END}"
    if MARK_BEGIN in old and MARK_END in old:
        head, rest = old.split(MARK_BEGIN, 1)
        new = head + block + rest.split(MARK_END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def _span(part: dict, path: Path) -> tuple[float, float]:
    """(start, end) of one ablation process in seconds since the epoch; a file without them ended when it was last
    written."""
    end = part.get("ended", Path(path).stat().st_mtime)
    return part.get("started", end - part["wall_s"]), end


def merge(paths: list[Path], results_md: Path | None, command: str | None = None) -> str:
    """One report from several ablation.json files (seeds run in separate processes, e.g. one per core, or one
    after another): each benchmark's rows in the order of the files; the wall time runs from the first process's
    start to the last one's end, the load range covers them all."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    results: dict[str, list] = {}
    seeds: dict[str, list[int]] = {}
    for part in parts:
        for bench, rows in part["rows"].items():
            results.setdefault(bench, []).extend(rows)
            seeds.setdefault(bench, []).extend(part["seeds"][: len(rows)])
    spans = [_span(part, p) for part, p in zip(parts, paths)]
    command = command or " ; ".join(part["command"] for part in parts) + " ; python benchmarks/ablation.py " \
        "--merge " + " ".join(map(str, paths))
    text, _ = report(results, seeds, max(e for _, e in spans) - min(s for s, _ in spans), command,
                     parts[0]["threads"], [x for part in parts for x in part["loads"]],
                     compute=sum(part["wall_s"] for part in parts) if len(parts) > 1 else None)
    if results_md:
        write_results_md(results_md, text)
    return text


def deal(seeds: list[int], jobs: int) -> list[list[int]]:
    """The seeds of each of ``jobs`` processes, dealt in turn: [0, 1, 2, 3, 4], 2 -> [[0, 2, 4], [1, 3]]."""
    return [part for part in (seeds[k::jobs] for k in range(jobs)) if part]


def run_parts(a: argparse.Namespace, seeds: list[int], results_md: Path | None, command: str) -> str:
    """``--jobs N``: one ablation process per part of the seeds, side by side at one thread each, each in its own
    folder ``OUT/part<k>/``; then their merged report, written to ``OUT/ablation.md`` and ``results_md``."""
    procs = []
    for k, part in enumerate(deal(seeds, a.jobs)):
        out = a.out / f"part{k}"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--seeds", ",".join(map(str, part)), "--benchmarks",
               a.benchmarks, "--out", str(out), "--results-md", "", "--extra", "--run.threads", "1", *a.extra]
        log = (out / "log.txt").open("w")
        procs.append((out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        print(f"[ablation] part {k}: seeds {','.join(map(str, part))}, log {out / 'log.txt'}", flush=True)
    failed = []
    for out, proc, log in procs:
        if proc.wait() != 0:
            failed.append(f"{out / 'log.txt'} (exit {proc.returncode})")
        log.close()
    if failed:
        raise SystemExit("[ablation] a part failed; its log: " + ", ".join(failed))
    text = merge([out / "ablation.json" for out, _, _ in procs], results_md, command)
    (a.out / "ablation.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    ap.add_argument("--benchmarks", default="default,shortcut", help="comma-separated: default, shortcut")
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    # a str, not a Path: Path("") is "." and would not read as "nowhere"
    ap.add_argument("--results-md", default=str(Path(__file__).with_name("RESULTS.md")),
                    help="where the tables go at the end (empty: nowhere)")
    ap.add_argument("--merge", nargs="+", type=Path, default=[], metavar="ABLATION_JSON",
                    help="run nothing: merge the ablation.json of runs made in separate processes into one report")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes side by side, one torch thread each (their seeds dealt in turn), then merged")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run (put last)")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    results_md = Path(a.results_md) if a.results_md else None
    if a.merge:
        print(merge(a.merge, results_md))
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    command = "python benchmarks/ablation.py " + " ".join(argv)
    if a.jobs > 1:
        print(run_parts(a, seeds, results_md, command))
        return
    benches = [b for b in a.benchmarks.split(",") if b]
    a.out.mkdir(parents=True, exist_ok=True)
    t0, loads = time.time(), [os.getloadavg()[0]]
    results: dict[str, list] = {b: [] for b in benches}
    text = ""
    for seed in seeds:
        for bench in benches:
            results[bench].append(run_seed(seed, a.out, bench, a.extra))
            loads.append(os.getloadavg()[0])
            done = {b: seeds[: len(results[b])] for b in benches}
            now = time.time()
            text, paired = report(results, done, now - t0, command, torch.get_num_threads(), loads)
            (a.out / "ablation.json").write_text(json.dumps(
                {"seeds": seeds, "rows": results, "paired": paired, "command": command, "wall_s": now - t0,
                 "started": t0, "ended": now, "threads": torch.get_num_threads(), "loads": loads}, indent=2))
            (a.out / "ablation.md").write_text(text + "\n")
            print(f"[ablation] {bench} seed {seed} done after {now - t0:.0f} s", flush=True)
    if results_md:
        write_results_md(results_md, text)
    print(f"\n{len(seeds)} seeds, {time.time() - t0:.0f} s\n\n{text}")


if __name__ == "__main__":
    main()
