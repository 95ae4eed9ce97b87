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
   ``conflict`` runs the same two methods on the conflict variant (the training label follows the badge, which
   disagrees with the cues on a share of training images): the mechanism study (benchmarks/precondition.py first).

For each benchmark: every method's columns (each evaluated split's accuracy, the run averages, the grounding and
reasoning rates of ``emor3.evaluate``) as the mean over seeds, with a bootstrap 95 % interval over seeds from 5 seeds
on and the seeds' range, named as such, below that; then paired differences (same seed, same Cold-Start checkpoint)
of EMO-R3 - GRPO and of each method - Cold-Start on every one of those numbers, with the percentile bootstrap
(``emor3.evaluate.paired_bootstrap``) and Student-t (``paired_t_interval``) 95 % intervals from 5 seeds on and the
exact sign test (``sign_test``) always; for ``default`` and ``conflict``, the preregistered EMO-R3 - GRPO
comparisons (``PRIMARY``: the paired t-test with Holm's correction over the three, tested from 8 seeds on). Rows
are sorted by seed, so a report depends on the per-seed rows only.
Printed whatever the outcome; written to runs/ablation/ablation.{md,json} after every seed (a stopped ablation keeps
what it finished) and, at the end, into benchmarks/RESULTS.md between the ``<!-- ablation:begin -->`` /
``<!-- ablation:end -->`` markers with the command, machine, load and wall time.

    python benchmarks/ablation.py                                   # 5 seeds, both benchmarks, default settings
    python benchmarks/ablation.py --jobs 2                          # the same in 2 processes, 1 thread each
    python benchmarks/ablation.py --seeds 0,1 --benchmarks shortcut --extra --grpo.steps 10   # quicker
    python benchmarks/ablation.py --seeds 0,2,4 --out runs/abl-a --results-md "" &      # parts by hand,
    python benchmarks/ablation.py --seeds 1,3 --out runs/abl-b --results-md "" ; wait   # then one report:
    python benchmarks/ablation.py --merge runs/abl-a/ablation.json runs/abl-b/ablation.json
    python benchmarks/ablation.py --report    # README's and RESULTS.md's tables from each study's artifacts (STUDIES)
    python benchmarks/ablation.py --rollouts benchmarks/main_runs   # step 3 in the logged training replies
    python benchmarks/ablation.py --benchmarks default --seeds 0,1,2,3,4,5,6,7 --jobs 2 \
        --selection benchmarks/selection_runs/selection.json   # the main table (make ablation), at the settings
        # chosen on validation: the Cold-Start step count, each method's own learning rate, the grid's step budget

``--jobs N`` deals the seeds out to N processes in turn (seeds 0,2,4 and 1,3 for two), each at one torch thread
(``--run.threads 1`` before ``--extra``) with its own folder ``OUT/part<k>`` and log ``OUT/part<k>/log.txt``, then
merges their ablation.json as ``--merge`` does. Every run seeds itself and builds its model from the checkpoint
folders, so which process runs a seed does not enter it; the thread count does (README, "Determinism").

Cost, measured on a 2-core CPU with two processes at one thread each: at the default settings of EmoScenes v3
(300 Cold-Start steps; benchmarks/RESULTS.md, "ablation") a ``shortcut`` seed (EMO-R3 with its Cold-Start SFT, then
GRPO) took about 26 min and a ``default`` seed (EMO-R3, the zero-shot evaluation, GRPO, DAPO) about 38 min; at the
validation-chosen settings (1600 Cold-Start steps, 150 GRPO steps) a ``default`` seed takes about 48 minutes
(benchmarks/main_runs/log-seeds-*.txt), so the 8-seed main table is about 6.5 process-hours, 3.3 hours with
``--jobs 2``.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from emor3.config import parse_args
from emor3.data.taxonomy import get_taxonomy
from emor3.evaluate import (CUE_KINDS, RUN_AVERAGES, evaluate, holm, paired_bootstrap, paired_t_interval,
                            paired_t_test, reply_scores, sign_test)
from emor3.rewards import parse_set
from emor3.run_folder import finished_run, prepare_run_dir
from emor3.stages.build import build
from emor3.toy.world import WORLD
from emor3.grpo.train import train

COLUMNS = RUN_AVERAGES  # each seed's run averages (one training setting; not the paper's two-setting A^I / A^O / A)
PAIRED = ("run A^I", "run A^O", "cue recall", "hallucinated", "format")  # the paired EMO-R3 - GRPO differences
MARK_BEGIN, MARK_END = "<!-- ablation:begin -->", "<!-- ablation:end -->"


def _train(algo: str, seed: int, out: Path, extra: list[str], *more: str) -> dict:
    """One run's evaluation rows; a run that already finished in ``out`` with these settings is read back, not run
    again (an ablation stopped part-way goes on where it stopped)."""
    cfg = parse_args(["--algo", algo, "--seed", str(seed), "--out", str(out), "--run.progress", "false",
                      "--overwrite", *more, *extra], "ablation", "")
    rows = finished_run(cfg, out)
    if rows is not None:
        print(f"[ablation] {out}: finished with these settings, its results.json is reused", flush=True)
        return rows
    return train(cfg)


def chosen_settings(path: Path) -> dict[str, list[str]]:
    """The flags each run takes from a benchmarks/selection.py record: Cold-Start SFT's step count for the run that
    trains it (key "sft") and each method's own learning rate with the step budget the rates were chosen at (keys
    "grpo", "dapo", "emo_r3"; the budget stays the grid's whatever the run's default). An error naming the file
    where a choice is missing, so a table is never run at settings nobody chose."""
    rec = json.loads(Path(path).read_text())
    missing = (["the Cold-Start step count"] if rec.get("sft_choice") is None else []) + \
        [f"the {m} learning rate" for m in ("grpo", "dapo", "emo_r3") if (rec.get("lr_choice") or {}).get(m) is None]
    if missing:
        raise SystemExit(f"{path}: the selection record has no choice of {', '.join(missing)} (run "
                         "benchmarks/selection.py to the end first)")
    flags = {"sft": ["--sft.steps", str(rec["sft_choice"])]}
    budget = ["--grpo.steps", str(rec["grpo_steps"])] if rec.get("grpo_steps") else []
    flags.update({m: ["--grpo.lr", str(lr), *budget] for m, lr in rec["lr_choice"].items()})
    return flags


def run_seed(seed: int, out: Path, benchmark: str, extra: list[str],
             chosen: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Every method's evaluation rows for one seed of one benchmark; ``chosen`` (``chosen_settings``): the
    validation-chosen Cold-Start steps and each method's learning rate, before ``extra``."""
    chosen = chosen or {}
    rows: dict[str, dict] = {}
    base = out / benchmark / f"seed{seed}"
    variant = ["--data.emoscenes-variant", benchmark]
    emo = base / "emo_r3"
    res = _train("emo_r3", seed, emo, extra, *chosen.get("sft", []), *chosen.get("emo_r3", []), *variant)
    # started from EMO-R3's Cold-Start checkpoint by path, GRPO and DAPO keep the tiny run's loss normaliser (a
    # --model.path run would take the release's; docs/method.md, "Where the paper is silent")
    from_sft = ("--model.path", str(emo / "sft"), "--sft.steps", "0", "--grpo.loss-scope", "mini-batch", *variant)
    if benchmark == "default":
        # zero-shot: the model the run started from (the tiny model's instruct stage, else its random init),
        # evaluated the same way
        start = emo / "instruct" if (emo / "instruct" / "config.json").is_file() else emo / "init"
        cfg = parse_args(["--seed", str(seed), "--out", str(base / "zero_shot"), "--model.path", str(start),
                          "--run.progress", "false", "--overwrite", *variant, *extra], "ablation", "")
        run = build(cfg, prepare_run_dir(cfg, "ablation"), WORLD)
        rows["Zero-shot"] = evaluate(run.model, run.processor, run.eval_sets, run.taxonomies, cfg.eval, seed=seed,
                                     device=run.device, progress=False)
    rows["Cold-Start SFT"] = res["Cold-Start SFT"]
    for algo in ("grpo", "dapo") if benchmark == "default" else ("grpo",):
        rows[algo.upper()] = _train(algo, seed, base / algo, extra, *chosen.get(algo, []), *from_sft)[algo]
    rows["EMO-R3"] = res["emo_r3"]
    return rows


# the reasoning and grounding numbers of a row (means over its sets that carry them): (label, results.json key)
GROUNDING = (("format", "format_rate"), ("no step 1", "no_step1"), ("cue recall", "cue_recall"),
             ("hallucinated", "hallucinated"), ("step 3 correct", "step3_correct"),
             ("answer agrees with step 3", "agreement"), ("accuracy where the badge agrees", "accuracy_badge_agrees"),
             ("accuracy where the badge disagrees", "accuracy_badge_disagrees"))
PER_KIND = (("recall face/sky/object", "cue_recall_by_kind"), ("hallucinated face/sky/object", "hallucinated_by_kind"))
MIN_SEEDS_FOR_INTERVAL = 5  # fewer seeds: the spread is reported as their range, never as an interval
# the paired comparisons of each benchmark: (method, the method it is compared with)
PAIRS = (("EMO-R3", "GRPO"), ("GRPO", "Cold-Start SFT"), ("DAPO", "Cold-Start SFT"), ("EMO-R3", "Cold-Start SFT"))
README_PAIRS = (("EMO-R3", "GRPO"),)  # the paired tables the README shows (RESULTS.md shows every one)


def metrics(row: dict) -> dict[str, float | None]:
    """The summary numbers of one evaluated row: each set's accuracy, A^I, A^O, A, then the `GROUNDING` rates
    (means over the sets that carry them; None where none does, e.g. rows scored before a rate existed)."""
    sets = row["sets"].values()

    def mean(key):
        xs = [v[key] for v in sets if v.get(key) is not None]
        return statistics.mean(xs) if xs else None

    return {**{name: v["accuracy"] for name, v in row["sets"].items()}, **{c: row[c] for c in COLUMNS},
            **{label: mean(key) for label, key in GROUNDING}}


def per_kind(row: dict, key: str) -> dict[str, float] | None:
    """The mean over a row's sets of a per-cue-kind rate (face, sky, object); None where no set has it."""
    out = {}
    for kind in CUE_KINDS:
        xs = [v[key][kind] for v in row["sets"].values() if (v.get(key) or {}).get(kind) is not None]
        if xs:
            out[kind] = statistics.mean(xs)
    return out or None


def mean_ci(values: list[float | None]) -> str:
    """Mean over seeds [bootstrap 95 % interval over seeds] from 5 seeds on; with fewer, the mean and the seeds'
    range, labelled as one ("range of 3 seeds")."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    if len(values) < MIN_SEEDS_FOR_INTERVAL:
        return f"{statistics.mean(values):.1f} (range {min(values):.1f} to {max(values):.1f})"
    m, lo, hi = paired_bootstrap(values, [0.0] * len(values))
    return f"{m:.1f} [{lo:.1f}, {hi:.1f}]"


def method_table(per_seed: list[dict[str, dict]]) -> str:
    """One row per method: every set's accuracy, the run averages and the grounding rates that any row has, each
    as ``mean_ci`` over seeds; the per-kind rates as the mean over seeds of each kind."""
    names = list(per_seed[0])
    sets = list(per_seed[0][names[0]]["sets"])
    rows = [s[name] for s in per_seed for name in names]
    grounding = [label for label, _ in GROUNDING if any(metrics(r)[label] is not None for r in rows)]
    kinds = [(label, key) for label, key in PER_KIND if any(per_kind(r, key) for r in rows)]
    head = sets + list(COLUMNS) + [f"{g} %" for g in grounding] + [f"{label} %" for label, _ in kinds]
    lines = ["| Method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name in names:
        runs = [s[name] for s in per_seed]
        cells = [mean_ci([metrics(r)[c] for r in runs]) for c in sets + list(COLUMNS) + grounding]
        for _, key in kinds:
            per = [per_kind(r, key) or {} for r in runs]
            cells.append(" / ".join(_fmt_mean([p.get(k) for p in per]) for k in CUE_KINDS))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_mean(xs: list[float | None]) -> str:
    xs = [x for x in xs if x is not None]
    return f"{statistics.mean(xs):.1f}" if xs else "–"


def paired_stats(a: list[float], b: list[float]) -> dict:
    """Paired differences a - b over seeds: the mean, per seed, the sign test, and from 5 seeds on the bootstrap
    and t intervals (``intervals`` False below that, where only the range of the differences is reported)."""
    d = [x - y for x, y in zip(a, b)]
    k, n, p = sign_test(a, b)
    out = {"diff": statistics.mean(d), "per_seed": d, "range": [min(d), max(d)], "sign": [k, n, p],
           "intervals": len(d) >= MIN_SEEDS_FOR_INTERVAL, "a": a, "b": b}
    if out["intervals"]:
        out["ci"] = list(paired_bootstrap(a, b)[1:])
        out["t_ci"] = list(paired_t_interval(a, b)[1:])
    return out


def paired_table(per_seed: list[dict[str, dict]], a_name: str = "EMO-R3", b_name: str = "GRPO") -> tuple[str, dict]:
    """``a_name`` minus ``b_name`` per seed on every metric both have: the means, the mean difference, its paired
    bootstrap and Student-t 95 % intervals (from 5 seeds on; below that the range of the differences, named as
    such) and the exact two-sided sign test."""
    lines = [f"| metric | {b_name} | {a_name} | {a_name} - {b_name} | bootstrap 95 % | t 95 % | sign test | per seed |",
             "|---|---|---|---|---|---|---|---|"]
    out = {}
    for key in metrics(per_seed[0][a_name]):
        pairs = [(metrics(s[a_name])[key], metrics(s[b_name])[key]) for s in per_seed]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if not pairs:
            continue
        a, b = [p[0] for p in pairs], [p[1] for p in pairs]
        st = out[key] = paired_stats(a, b)
        lines.append(f"| {key} | {statistics.mean(b):.1f} | {statistics.mean(a):.1f} | {st['diff']:+.1f} | "
                     + " | ".join(paired_cells(st)) + " |")
    return "\n".join(lines), out


def _on(split: str, key: str):
    return lambda row: row["sets"][split].get(key)


# The preregistered primary comparisons of EMO-R3 - GRPO (benchmarks/RESULTS.md, "Primary metrics and predicted
# directions"): (name, metric, predicted sign of the difference, the metric of a row)
PRIMARY = {
    "default": (("P1", "compositional accuracy", +1, _on("compositional", "accuracy")),
                ("P2", "answer agrees with step 3 % (mean over the sets)", +1,
                 lambda row: metrics(row)["answer agrees with step 3"]),
                ("P3", "hallucinated cues % (mean over the sets)", -1, lambda row: metrics(row)["hallucinated"])),
    "conflict": (("M1", "ood_shortcut accuracy", +1, _on("ood_shortcut", "accuracy")),
                 ("M2", "ood_shortcut hallucinated cues %", -1, _on("ood_shortcut", "hallucinated")),
                 ("M3", "ood_shortcut answer agrees with step 3 %", +1, _on("ood_shortcut", "agreement"))),
}
PRIMARY_MIN_SEEDS = 8  # the protocol's seed count: with fewer, the comparisons are shown but not tested
ALPHA = 0.05


def primary_table(per_seed: list[dict[str, dict]], bench: str) -> tuple[str, dict]:
    """The preregistered EMO-R3 - GRPO comparisons of ``bench``: per comparison the means, the mean difference, its
    Student-t 95 % interval, the two-sided paired t-test's p, Holm's adjustment over the study's comparisons and
    the sign test, and the differences per seed (in the order of ``per_seed``). A comparison is shown when its
    Holm-adjusted p is below 0.05 and the difference has the predicted sign. With fewer than ``PRIMARY_MIN_SEEDS``
    seeds it is not tested: the means, the differences' range and the sign test only, no interval or p of the
    t-test."""
    rows, out = [], {}
    for name, label, sign, get in PRIMARY[bench]:
        a, b = [get(s["EMO-R3"]) for s in per_seed], [get(s["GRPO"]) for s in per_seed]
        mean, _, p = paired_t_test(a, b)
        rows.append((name, label, sign, a, b, mean, p))
    adjusted = holm([r[6] for r in rows])
    n = len(per_seed)
    lines = ["| | metric | predicted | GRPO | EMO-R3 | EMO-R3 - GRPO | t 95 % | t-test p | Holm p | sign test | "
             "verdict | per seed |", "|---" * 12 + "|"]
    for (name, label, sign, a, b, mean, p), p_holm in zip(rows, adjusted):
        k, m, p_sign = sign_test(a, b)
        d = [x - y for x, y in zip(a, b)]
        out[name] = {"metric": label, "predicted": sign, "diff": mean, "range": [min(d), max(d)],
                     "sign": [k, m, p_sign]}
        if n < PRIMARY_MIN_SEEDS:
            out[name]["verdict"] = f"not tested ({n} of {PRIMARY_MIN_SEEDS} seeds)"
            t_cells = [f"range of {n} seeds [{min(d):+.1f}, {max(d):+.1f}]", "–", "–"]
        else:
            _, lo, hi = paired_t_interval(a, b)
            out[name].update(t_ci=[lo, hi], p=p, p_holm=p_holm,
                             verdict="shown" if p_holm < ALPHA and mean * sign > 0 else "not shown")
            t_cells = [f"[{lo:+.1f}, {hi:+.1f}]", f"{p:.3g}", f"{p_holm:.3g}"]
        lines.append(f"| {name} | {label} | EMO-R3 {'>' if sign > 0 else '<'} GRPO | {statistics.mean(b):.1f} | "
                     f"{statistics.mean(a):.1f} | {mean:+.1f} | " + " | ".join(t_cells) +
                     f" | {k} of {m} > 0, p = {p_sign:.3g} | {out[name]['verdict']} | "
                     + ", ".join(f"{x:+.1f}" for x in d) + " |")
    return "\n".join(lines), out


def paired_cells(st: dict) -> list[str]:
    """A ``paired_stats`` result as table cells: bootstrap interval, t interval (below 5 seeds the range of the
    differences, named as such, and no t), sign test, the differences per seed."""
    if st["intervals"]:
        boot, t = ("[{:+.1f}, {:+.1f}]".format(*st[k]) for k in ("ci", "t_ci"))
    else:
        boot, t = "range of {} seeds [{:+.1f}, {:+.1f}]".format(len(st["per_seed"]), *st["range"]), "–"
    k, n, p = st["sign"]
    return [boot, t, f"{k} of {n} > 0, p = {p:.3g}", ", ".join(f"{x:+.1f}" for x in st["per_seed"])]


def _order(results: dict[str, list], seeds: dict[str, list[int]]) -> tuple[dict[str, list], dict[str, list[int]]]:
    """Each benchmark's rows sorted by seed, so a report does not depend on which process ran which seed."""
    res, sd = {}, {}
    for bench, rows in results.items():
        pairs = sorted(zip(seeds[bench], rows), key=lambda p: p[0])
        res[bench], sd[bench] = [r for _, r in pairs], [s for s, _ in pairs]
    return res, sd


OLD_METRICS_NOTE = ("Rows without the `no step 1` column were scored before it existed: their cue recall and "
                    "hallucinated-cue rate are over all answers (an answer without a step 1 counted as 0 % "
                    "hallucinated), a negation by \"n't\" did not negate and \"sun\" in a dusk scene counted as "
                    "claiming a sunny sky; EmoScenes was at version 3 (every cue combination in train and test).")


def report(results: dict[str, list], seeds: dict[str, list[int]], wall: float, command: str, threads: int,
           loads: list[float], compute: float | None = None, *, machine: str | None = None,
           date: str | None = None, pairs=PAIRS, primary: bool = False) -> tuple[str, dict]:
    """The tables of every benchmark (rows sorted by seed); ``seeds[bench]`` names the seed of each of
    ``results[bench]``'s rows, ``wall`` is the time from the first run's start to the last one's end and
    ``compute`` the sum of the processes' wall times (when they ran side by side). ``machine`` and ``date``
    describe where and when the runs ran (the artifacts' own record; "not recorded" where they lack it)."""
    results, seeds = _order(results, seeds)
    done = "; ".join(f"{b} {','.join(map(str, seeds[b]))}" for b in results if results[b])
    spent = f"wall time {wall / 60:.0f} min" + (f" ({compute / 60:.0f} process-minutes)" if compute else "")
    head = (f"Command: `{command}`. Seeds: {done}; torch threads {threads}; machine: "
            f"{machine or 'not recorded in the artifacts'}; load average (1 min) {min(loads):.1f}-{max(loads):.1f}"
            f" during the run; {spent}; {date or 'date not recorded'}.")
    text, paired = tables(results, seeds, pairs, primary)
    return head + "\n\n" + text, paired


def tables(results: dict[str, list], seeds: dict[str, list[int]], pairs=PAIRS,
           primary: bool = False) -> tuple[str, dict]:
    """``report`` without its first paragraph (how the runs ran): how to read the cells, then each benchmark's
    method table, its preregistered comparisons (``primary``: ``PRIMARY``, where the benchmark has them) and its
    paired tables, rows sorted by seed."""
    results, seeds = _order(results, seeds)
    parts = [f"Cells: mean over seeds [bootstrap 95 % interval over seeds] from {MIN_SEEDS_FOR_INTERVAL} seeds on; "
             "with fewer seeds, the mean and the range of the seeds (not an interval). Paired tables: both methods "
             "start from the same Cold-Start checkpoint of each seed; differences per seed in seed order; the "
             "bootstrap (percentile, 10000 resamples) and Student-t intervals are given from "
             f"{MIN_SEEDS_FOR_INTERVAL} seeds on, the exact two-sided sign test always (zero differences left out; "
             "with n seeds its p is at least 2 / 2^n: 0.25 for 3, 0.0625 for 5)."]
    if any("no_step1" not in v for rows in results.values() for r in rows for m in r.values()
           for v in m["sets"].values()):
        parts.append(OLD_METRICS_NOTE)
    paired: dict = {}
    for bench, per_seed in results.items():
        if not per_seed:
            continue
        parts.append(f"### {bench} ({len(per_seed)} seeds)\n\n" + method_table(per_seed))
        paired[bench] = {}
        if primary and bench in PRIMARY and len(per_seed) >= 2:
            table, paired[bench]["primary"] = primary_table(per_seed, bench)
            parts.append(f"Preregistered comparisons, {bench}: EMO-R3 - GRPO (shown: Holm-adjusted t-test p < "
                         f"{ALPHA} over the {len(PRIMARY[bench])} and the predicted sign; tested from "
                         f"{PRIMARY_MIN_SEEDS} seeds on)\n\n" + table)
        for a_name, b_name in pairs:
            if a_name in per_seed[0] and b_name in per_seed[0]:
                table, paired[bench][f"{a_name} - {b_name}"] = paired_table(per_seed, a_name, b_name)
                parts.append(f"Paired, {bench}: {a_name} - {b_name}\n\n" + table)
    return "\n\n".join(parts), paired


def write_results_md(path: Path, text: str, begin: str = MARK_BEGIN, end: str = MARK_END,
                     title: str = "## ablation: benchmarks/ablation.py (its own output)\n\n") -> None:
    """Replace the block between the markers of a markdown file (RESULTS.md, README.md), or append one."""
    old = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{title}{text}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def _invocations(part: dict, path: Path) -> list[dict]:
    """Each invocation of one part, ``{started, ended, wall_s, loads}`` (seconds since the epoch): the ones a
    continued part carries (``earlier_invocations``), then its last; a file without its start and end ended when it
    was last written."""
    end = part.get("ended", Path(path).stat().st_mtime)
    last = {"started": part.get("started", end - part["wall_s"]), "ended": end, "wall_s": part["wall_s"],
            "loads": part["loads"]}
    return part.get("earlier", []) + [last]


def earlier_invocations(path: Path, command: str) -> list[dict]:
    """The invocations of a part before this one (``_invocations``) when ``path`` is the ablation.json a stopped
    invocation of the same command left; else none. A continued part reads back the runs they finished, so their
    time is the part's time too."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return _invocations(old, path) if old.get("command") == command and "started" in old else []


def _timing(invocations: list[dict]) -> tuple[float, list[float], float]:
    """The invocations' busy time (``busy_time`` of their spans), every load sample, and their summed wall time."""
    return (busy_time([(r["started"], r["ended"]) for r in invocations]),
            [x for r in invocations for x in r["loads"]], sum(r["wall_s"] for r in invocations))


def busy_time(spans: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of the (start, end) spans ran: their union's length, so that parts run
    with a pause between them (a part started later) count their own time, not the pause."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def merged_report(paths: list[Path], command: str | None = None, pairs=PAIRS, primary: bool = False) -> str:
    """One report from several ablation.json files (seeds run in separate processes, e.g. one per core, or one
    after another): each benchmark's rows sorted by seed; the wall time is the time at least one process ran
    (``busy_time``, over every invocation of each part), the load range covers them all. Depends on the files
    only."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    results: dict[str, list] = {}
    seeds: dict[str, list[int]] = {}
    for part in parts:
        for bench, rows in part["rows"].items():
            results.setdefault(bench, []).extend(rows)
            seeds.setdefault(bench, []).extend(part["seeds"][: len(rows)])
    invocations = [r for part, p in zip(parts, paths) for r in _invocations(part, p)]
    wall, loads, compute = _timing(invocations)
    command = command or " ; ".join(part["command"] for part in parts) + " ; python benchmarks/ablation.py " \
        "--merge " + " ".join(map(str, paths))
    machines = sorted({part["machine"] for part in parts if part.get("machine")})
    end = datetime.datetime.fromtimestamp(max(r["ended"] for r in invocations), datetime.timezone.utc)
    text, _ = report(results, seeds, wall, command, parts[0]["threads"], loads,
                     compute=compute if len(invocations) > 1 else None, machine="; ".join(machines) or None,
                     date=end.date().isoformat(), pairs=pairs, primary=primary)
    return text


def merge(paths: list[Path], results_md: Path | None, command: str | None = None) -> str:
    """``merged_report`` of the files, written into ``results_md`` between the markers (unless None)."""
    text = merged_report(paths, command)
    if results_md:
        write_results_md(results_md, text)
    return text


# --------------------------------------------------------------------------------------------- --report

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "benchmarks" / "ablation_runs"  # the committed ablation.json of every reported part
README_BEGIN, README_END = "<!-- ablation-readme:begin -->", "<!-- ablation-readme:end -->"


@dataclass(frozen=True)
class Study:
    """One reported study: the folder of its committed ablation.json parts, its block in RESULTS.md, and whether
    its report carries the preregistered comparisons (``PRIMARY``)."""

    name: str
    folder: Path
    begin: str
    end: str
    title: str
    primary: bool


STUDIES = (
    Study("ablation", ARTIFACTS, MARK_BEGIN, MARK_END, "## ablation: benchmarks/ablation.py (its own output)\n\n",
          False),
    Study("main", REPO / "benchmarks" / "main_runs", "<!-- main-table:begin -->", "<!-- main-table:end -->",
          "## The main table: Cold-Start SFT, GRPO, DAPO, EMO-R3 at the validation-chosen settings "
          "(benchmarks/ablation.py --report)\n\n", True),
    Study("mechanism", REPO / "benchmarks" / "mechanism_runs" / "study", "<!-- mechanism-study:begin -->",
          "<!-- mechanism-study:end -->", "## The mechanism study: EMO-R3 against GRPO on the conflict variant "
          "(benchmarks/ablation.py --report)\n\n", True),
)
README_STUDY = "main"  # the study whose tables the README shows


ROLLOUT_METHODS = {"grpo": "GRPO", "dapo": "DAPO", "emo_r3": "EMO-R3"}  # run folder -> row name


def windowed_replies(samples: Path, windows: list[int]):
    """(window index, reply) for each reply logged in ``samples`` (a run's samples.jsonl) whose step falls in one of
    the step windows (``windows`` are the windows' last steps, ascending; a window holds the steps after the previous
    one's); replies after the last window are left out."""
    for line in samples.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        i = bisect.bisect_left(windows, r["step"])  # the window whose last step is the first at or after this one
        if r["step"] >= 1 and i < len(windows):
            yield i, r


def rollout_reasoning(samples: Path, windows: list[int]) -> list[dict]:
    """Per step window of one run's logged training replies (``samples.jsonl``; ``windows`` are the windows' last
    steps, ascending): the replies, those with a step 3, those whose step 3 states the scene's valence and arousal,
    those with a step 3 and a boxed label that has both, those whose label agrees with step 3, and the correct
    ones: the evaluation's definitions (``emor3.evaluate.reply_scores``), on the training images."""
    out = [{"steps": [lo + 1, hi], "replies": 0, "step3": 0, "step3_correct": 0, "judged": 0, "agreement": 0,
            "correct": 0} for lo, hi in zip([0, *windows], windows)]
    for i, r in windowed_replies(samples, windows):
        sample = SimpleNamespace(metadata={"cues": r["cues"]}, label=r["label"])
        sc = reply_scores(parse_set(r["completion"]), sample, get_taxonomy(r["taxonomy"]))
        c = out[i]
        c["replies"] += 1
        c["correct"] += r["accuracy"] > 0
        if sc is not None and sc["step3_correct"] is not None:
            c["step3"] += 1
            c["step3_correct"] += sc["step3_correct"]
        if sc is not None and sc["agreement"] is not None:
            c["judged"] += 1
            c["agreement"] += sc["agreement"]
    return out


def has_rollouts(folder: Path) -> bool:
    return any(next(folder.glob(f"seed*/{m}/samples.jsonl"), None) for m in ROLLOUT_METHODS)


def rollouts_report(folder: Path, windows: list[int] | None = None) -> str:
    """``rollout_reasoning`` pooled over the seeds of ``folder/seed*/<method>/samples.jsonl`` per method and step
    window, with each seed's share beside it; without ``windows``, the thirds of the last logged step."""
    runs = {m: sorted(folder.glob(f"seed*/{m}/samples.jsonl"), key=lambda p: int(p.parent.parent.name[4:]))
            for m in ROLLOUT_METHODS}
    if not any(runs.values()):
        raise SystemExit(f"{folder}: no seed*/<method>/samples.jsonl")
    if not windows:
        last = max(json.loads(line)["step"] for ps in runs.values() for p in ps
                   for line in p.read_text().splitlines() if line.strip())
        windows = sorted({round(last * k / 3) for k in (1, 2, 3)} - {0})

    def pct(a: int, b: int) -> str:
        return f"{100 * a / b:.1f}" if b else "–"

    shown = folder.resolve().relative_to(REPO) if folder.resolve().is_relative_to(REPO) else folder
    lines = [f"Rollouts: `python benchmarks/ablation.py --rollouts {shown.as_posix()} --windows "
             f"{','.join(map(str, windows))}` (the training replies each run logged, `samples.jsonl`: the first two "
             "prompts' samples every `--run.sample-every` steps). Shares pooled over the seeds, then each seed's "
             "in seed order. Correct is the accuracy reward's verdict, against the training label (on the "
             "conflict variant, the badge's); step 3 correct (against the scene's cues) is over the replies with a "
             "step 3, agreement over those with a step 3 and a boxed label, as in the evaluation.", "",
             "| method | steps | seeds | replies | correct % | step 3 correct % (per seed) | answer agrees with "
             "step 3 % (per seed) |", "|---|---|---|---|---|---|---|"]
    for m, paths in runs.items():
        if not paths:
            continue
        per = [rollout_reasoning(p, windows) for p in paths]
        for i in range(len(windows)):
            cs = [counts[i] for counts in per]
            tot = {k: sum(c[k] for c in cs) for k in cs[0] if k != "steps"}
            lo, hi = cs[0]["steps"]
            lines.append(
                f"| {ROLLOUT_METHODS[m]} | {lo}-{hi} | {len(cs)} | {tot['replies']} | "
                f"{pct(tot['correct'], tot['replies'])} | {pct(tot['step3_correct'], tot['step3'])} "
                f"({', '.join(pct(c['step3_correct'], c['step3']) for c in cs)}) | "
                f"{pct(tot['agreement'], tot['judged'])} ({', '.join(pct(c['agreement'], c['judged']) for c in cs)}) |")
    return "\n".join(lines)


def artifact_paths(folder: Path = ARTIFACTS) -> list[Path]:
    return sorted(folder.glob("*.json"))


def _rel(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in paths]


def report_texts(paths: list[Path], primary: bool = False) -> tuple[str, str]:
    """(RESULTS.md's block, README.md's) regenerated from the artifacts alone: the full report, and the README's
    part of it (every method table, the preregistered comparisons and the ``README_PAIRS`` paired tables)."""
    rel = _rel(paths)
    parts = [json.loads(Path(p).read_text()) for p in paths]
    command = " ; ".join(part["command"] for part in parts) + " ; python benchmarks/ablation.py --report (" + \
        ", ".join(rel) + ")"
    full = merged_report(paths, command, primary=primary)
    short = merged_report(paths, command, pairs=README_PAIRS, primary=primary)
    return full, short


def write_report(results_md: Path, readme: Path, studies=STUDIES, readme_study: str = README_STUDY) -> str:
    """Every study's block of ``results_md`` from its committed artifacts (a study without any is left out), with
    ``rollouts_report`` where its runs' samples.jsonl are committed, and the README's tables from
    ``readme_study``'s."""
    texts = []
    for study in studies:
        paths = artifact_paths(study.folder)
        if not paths:
            continue
        full, short = report_texts(paths, study.primary)
        if has_rollouts(study.folder):  # the reasoning in the runs' logged training replies
            full += "\n\n" + rollouts_report(study.folder)
        write_results_md(results_md, full, study.begin, study.end, study.title)
        if study.name == readme_study:
            write_results_md(readme, "```\n" + short + "\n```", README_BEGIN, README_END, title="")
        texts.append(full)
    return "\n\n".join(texts)


def machine_line() -> str:
    """Where this process runs, as its ablation.json records it: CPU count and model, torch build."""
    return f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}"


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
               a.benchmarks, "--out", str(out), "--results-md", "",
               *(["--selection", str(a.selection.resolve())] if a.selection else []),
               "--extra", "--run.threads", "1", *a.extra]
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
    ap.add_argument("--benchmarks", default="default,shortcut", help="comma-separated: default, shortcut, conflict")
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"),
                    help="the runs' folder; a run already finished there with the same settings is reused (remove "
                         "its folder to run it again)")
    # a str, not a Path: Path("") is "." and would not read as "nowhere"
    ap.add_argument("--results-md", default=str(Path(__file__).with_name("RESULTS.md")),
                    help="where the tables go at the end (empty: nowhere)")
    ap.add_argument("--merge", nargs="+", type=Path, default=[], metavar="ABLATION_JSON",
                    help="run nothing: merge the ablation.json of runs made in separate processes into one report")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: regenerate the tables of RESULTS.md and README.md from the committed "
                         "artifacts (the ablation.json parts in benchmarks/ablation_runs, benchmarks/main_runs and "
                         "benchmarks/mechanism_runs/study)")
    ap.add_argument("--rollouts", type=Path, default=None, metavar="FOLDER",
                    help="run nothing: step 3's correctness and the answer's agreement with it in the training "
                         "replies each run logged, FOLDER/seed*/<method>/samples.jsonl (e.g. benchmarks/main_runs)")
    ap.add_argument("--windows", default="",
                    help="with --rollouts: comma-separated last steps of the step windows (default: the thirds of "
                         "the last logged step)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes side by side, one torch thread each (their seeds dealt in turn), then merged")
    ap.add_argument("--selection", type=Path, default=None, metavar="SELECTION_JSON",
                    help="take the Cold-Start step count and each method's learning rate from this "
                         "benchmarks/selection.py record (chosen on validation); --extra still goes last")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run (put last)")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    results_md = Path(a.results_md) if a.results_md else None
    if a.rollouts:
        print(rollouts_report(a.rollouts, [int(w) for w in a.windows.split(",") if w]))
        return
    if a.report:
        print(write_report(REPO / "benchmarks" / "RESULTS.md", REPO / "README.md"))
        return
    if a.merge:
        print(merge(a.merge, results_md))
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    command = "python benchmarks/ablation.py " + " ".join(argv)
    if a.selection:
        chosen_settings(a.selection)  # a record without its choices stops here, before any process starts
    if a.jobs > 1:
        print(run_parts(a, seeds, results_md, command))
        return
    benches = [b for b in a.benchmarks.split(",") if b]
    chosen = chosen_settings(a.selection) if a.selection else None
    a.out.mkdir(parents=True, exist_ok=True)
    earlier = earlier_invocations(a.out / "ablation.json", command)
    t0, loads = time.time(), [os.getloadavg()[0]]
    machine = machine_line()
    results: dict[str, list] = {b: [] for b in benches}
    text = ""
    for seed in seeds:
        for bench in benches:
            results[bench].append(run_seed(seed, a.out, bench, a.extra, chosen))
            loads.append(os.getloadavg()[0])
            done = {b: seeds[: len(results[b])] for b in benches}
            now = time.time()
            wall, all_loads, _ = _timing(earlier + [{"started": t0, "ended": now, "wall_s": now - t0,
                                                     "loads": loads}])
            text, paired = report(results, done, wall, command, torch.get_num_threads(), all_loads,
                                  machine=machine, date=datetime.date.today().isoformat())
            (a.out / "ablation.json").write_text(json.dumps(
                {"seeds": seeds, "rows": results, "paired": paired, "command": command, "wall_s": now - t0,
                 "started": t0, "ended": now, "threads": torch.get_num_threads(), "loads": loads,
                 "machine": machine, **({"earlier": earlier} if earlier else {})}, indent=2))
            (a.out / "ablation.md").write_text(text + "\n")
            print(f"[ablation] {bench} seed {seed} done after {now - t0:.0f} s", flush=True)
    if results_md:
        write_results_md(results_md, text)
    print(f"\n{len(seeds)} seeds, {time.time() - t0:.0f} s\n\n{text}")


if __name__ == "__main__":
    main()
