"""Settings chosen on EmoScenes' validation split only: Cold-Start SFT's step count, then each method's learning rate.

Every run here evaluates with ``--data.emoscenes-eval validation``, so no test image is read while choosing.
1. Cold-Start SFT, early stopping over a step grid: per selection seed and per step count of ``--sft-steps``,
   Cold-Start SFT for that many steps (``python -m emor3.sft``), the checkpoint evaluated on validation
   (``python -m emor3.evaluate``). The chosen count is the one with the best mean validation accuracy over the
   seeds, the smaller count on a tie: past it, validation stopped improving. Its curve (steps -> accuracy per seed)
   is part of the report.
2. Each method's learning rate, at one step budget: per seed, method (``--methods``) and learning rate (``--lrs``),
   GRPO training from that seed's Cold-Start checkpoint at the chosen step count (``--sft.steps 0``), the same
   ``--grpo.steps`` for all, evaluated on validation. Each method keeps the rate with its best mean validation
   accuracy over the seeds (the smaller rate on a tie): every method at its own best, none inheriting another's.
3. The default run's GRPO step budget (``--stage budget``, for the method ``make train`` runs): per seed, that
   method at its chosen rate from the chosen Cold-Start checkpoint for the grid's largest count (``--budget-steps``),
   checkpointing at every count of the grid, each checkpoint evaluated on validation. The learning rate is
   constant (``--grpo.schedule constant``, no warm-up), so the checkpoint after k steps is the model a k-step run
   ends with. The chosen budget is the one with the best mean validation accuracy among the counts that fit the
   default run's time (``--budget-max``, from its measured step time), the smaller count on a tie.
Use selection seeds that are not the reporting seeds. The record (every score and the choices) is written to
OUT/selection.json and OUT/selection.md after every run, and with ``--results-md`` into benchmarks/RESULTS.md
between the ``<!-- selection:begin -->`` / ``<!-- selection:end -->`` markers.

Runs in parts. A grid point whose evaluation (``.../eval/results.json``) is already in OUT is read, not run again,
so a stopped selection goes on where it stopped. Several processes started with the same arguments share the work:
each claims a point before running it (a file under OUT/claims naming its process; a claim whose process is gone
is taken over) and waits for the others' points before choosing. ``--stage sft`` stops after the Cold-Start curve;
``--collect`` runs nothing and rebuilds the record from the points in OUT (benchmarks/selection_runs holds the
reported ones: ``python benchmarks/selection.py --collect --out benchmarks/selection_runs --stage sft ...``).

    python benchmarks/selection.py --seeds 100,101,102 --sft-steps 100,200,300,500,800 --lrs 1e-4,3e-4,5e-4
    python benchmarks/selection.py --seeds 100 --sft-steps 4,8 --lrs 1e-4,3e-4 --extra --config examples/quick.toml
    python benchmarks/selection.py --stage sft & python benchmarks/selection.py --stage sft; wait   # two processes
    python benchmarks/selection.py --stage budget --budget-steps 25,50,75,100,125,150 --budget-max 75 ...

Cost at the default sizes: stage 1 trains sum(--sft-steps) SFT steps per seed, stage 2 runs
len(methods) x len(lrs) GRPO runs per seed (each about a default run without its instruct stage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path

import ablation  # benchmarks/ablation.py, beside this script
from emor3.config import parse_args
from emor3.evaluate import main as evaluate_main
from emor3.grpo.train import train
from emor3.sft import main as sft_main

SELECT = ["--data.emoscenes-eval", "validation"]  # every run of the selection reads validation, never test
MARK_BEGIN, MARK_END = "<!-- selection:begin -->", "<!-- selection:end -->"


def validation_accuracy(rows: dict, name: str) -> float:
    """The validation accuracy of row ``name`` of a results.json; an error if the run evaluated anything else."""
    sets = rows[name]["sets"]
    if set(sets) != {"validation"}:
        raise RuntimeError(f"a selection run evaluated {sorted(sets)}: it must read validation only")
    return sets["validation"]["accuracy"]


def choose(grid: list, scores: dict) -> object:
    """The grid value with the best mean score over seeds; on a tie the earlier one in ``grid`` (the smaller step
    count or rate when the grid is sorted)."""
    means = {v: statistics.mean(scores[v]) for v in grid if scores.get(v)}
    if not means:
        raise ValueError("no scores to choose from")
    best = max(means.values())
    return next(v for v in grid if v in means and means[v] == best)


def sft_point(seed: int, steps: int, out: Path, extra: list[str]) -> float:
    """Cold-Start SFT of ``steps`` steps for ``seed`` into ``out/sft``, then its validation accuracy."""
    common = ["--seed", str(seed), "--run.progress", "false", "--overwrite", *SELECT, *extra]
    sft_main(["--out", str(out), "--sft.steps", str(steps), *common])
    evaluate_main(["--model.path", str(out / "sft"), "--out", str(out / "eval"), *common])
    return validation_accuracy(json.loads((out / "eval" / "results.json").read_text()), "sft")


def grpo_point(algo: str, lr: str, seed: int, sft_dir: Path, out: Path, extra: list[str]) -> float:
    """``algo`` at learning rate ``lr`` from the Cold-Start checkpoint ``sft_dir``, its validation accuracy."""
    # from a checkpoint by path, the run keeps the tiny run's loss normaliser (as benchmarks/ablation.py does)
    res = train(parse_args(["--algo", algo, "--seed", str(seed), "--out", str(out), "--run.progress", "false",
                            "--overwrite", "--model.path", str(sft_dir), "--sft.steps", "0", "--grpo.loss-scope",
                            "mini-batch", "--grpo.lr", lr, *SELECT, *extra], "selection", ""))
    return validation_accuracy(res, algo)


def budget_point(algo: str, lr: str, seed: int, sft_dir: Path, out: Path, grid: list[int], extra: list[str]) -> None:
    """``algo`` at ``lr`` from ``sft_dir`` for ``max(grid)`` steps, checkpointing at every count of ``grid``; each
    checkpoint evaluated on validation into ``out/eval-<k>``, the largest count last (its results.json marks the
    point finished)."""
    every = math.gcd(*grid)
    grpo_point(algo, lr, seed, sft_dir, out, ["--grpo.steps", str(max(grid)), "--grpo.schedule", "constant",
                                               "--grpo.warmup-steps", "0", "--run.save-every", str(every),
                                               "--run.keep-checkpoints", str(max(grid) // every), *extra])
    for k in sorted(grid):
        evaluate_main(["--model.path", str(out / f"checkpoint-{k}" / "model"), "--out", str(out / f"eval-{k}"),
                       "--seed", str(seed), "--run.progress", "false", "--overwrite", *SELECT, *extra])


def ran_steps(run_dir: Path) -> int:
    """The GRPO step count a finished run was configured with (its config.toml)."""
    return int(tomllib.loads((run_dir / "config.toml").read_text())["grpo"]["steps"])


def finished(result: Path, name: str) -> float | None:
    """The validation accuracy a finished point left in ``result`` (a results.json), or None."""
    return validation_accuracy(json.loads(result.read_text()), name) if result.is_file() else None


def claim(claims: Path, point: str) -> bool:
    """Take grid point ``point`` for this process: True when no live process holds it (a claim names its pid;
    the claim of a process that is gone is taken over)."""
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / point
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or "0")
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def run_points(points: list, claims: Path, poll_s: float = 20.0) -> None:
    """Run each ``(name, result_path, run)`` point not yet finished that no other live process holds, then wait
    until every point has its result (points other processes run)."""
    waiting = True
    while waiting:
        waiting = False
        for name, result, run in points:
            if result.is_file():
                continue
            if claim(claims, name):
                run()
                (claims / name).unlink(missing_ok=True)
            else:
                waiting = True
        if waiting:
            time.sleep(poll_s)


def _cell(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} (range {min(xs):.2f} to {max(xs):.2f})"


def _curve(head: str, grid: list[int], scores: dict, seeds: list[int]) -> list[str]:
    """A step-count curve as table lines: one row per count of ``grid``, each seed's score of ``scores[count][seed]``
    ("–" where it is missing) and their mean (range)."""
    lines = [f"| {head} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
    for k in grid:
        per = scores.get(str(k), {})
        cells = [f"{per[str(s)]:.2f}" if str(s) in per else "–" for s in seeds]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {_cell(list(per.values()))} |")
    return lines


def report(rec: dict) -> str:
    """The record as markdown: the SFT curve, the learning-rate grid per method, and the choices."""
    seeds = rec["seeds"]
    lines = [f"Command: `{rec['command']}`. Selection seeds: {', '.join(map(str, seeds))}; every run evaluated on "
             f"`validation` only. Cells: validation accuracy %, mean over seeds (range of the seeds).", "",
             "Cold-Start SFT (early stopping over steps):", "",
             *_curve("SFT steps", rec["sft_steps"], rec["sft"], seeds)]
    if rec.get("sft_choice") is not None:
        lines += ["", f"Chosen: {rec['sft_choice']} Cold-Start steps."]
    if rec.get("grpo"):
        lrs = rec["lrs"]
        lines += ["", f"Learning rate per method ({rec['grpo_steps']} GRPO steps from the chosen Cold-Start "
                  "checkpoint of each seed):", "", "| method | " + " | ".join(f"lr {lr}" for lr in lrs)
                  + " | chosen |", "|---" * (len(lrs) + 2) + "|"]
        for algo, per_lr in rec["grpo"].items():
            cells = [_cell(list(per_lr.get(lr, {}).values())) for lr in lrs]
            lines.append(f"| {algo} | " + " | ".join(cells) + f" | {rec['lr_choice'].get(algo, '–')} |")
    if rec.get("budget"):
        algo, grid = rec["budget_method"], rec["budget_steps"]
        lines += ["", f"The default run's GRPO step budget ({algo} at its chosen rate, checkpoints of one "
                  f"{max(grid)}-step run per seed; counts above {rec['budget_max']} do not fit the default run's "
                  "time and are not chosen):", "", *_curve("GRPO steps", grid, rec["budget"], seeds)]
        if rec.get("budget_choice") is not None:
            lines += ["", f"Chosen: {rec['budget_choice']} GRPO steps."]
    return "\n".join(lines)


def write_results_md(path: Path, text: str) -> None:
    """Replace the selection block of RESULTS.md (between its markers), or append one."""
    ablation.write_results_md(path, text, MARK_BEGIN, MARK_END,
                              title="## selection: benchmarks/selection.py (its own output)\n\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="100,101,102", help="comma-separated selection seeds (not reporting seeds)")
    ap.add_argument("--sft-steps", default="100,200,300,500,800", help="Cold-Start SFT step grid, ascending")
    ap.add_argument("--lrs", default="1e-4,3e-4,5e-4", help="learning-rate grid, every method the same")
    ap.add_argument("--methods", default="grpo,dapo,emo_r3", help="comma-separated --algo values")
    ap.add_argument("--out", type=Path, default=Path("runs/selection"))
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: the record and tables of the points already in --out (e.g. committed ones)")
    ap.add_argument("--stage", choices=["sft", "all", "budget"], default="all",
                    help="sft: only Cold-Start SFT's curve and its choice; all: then each method's learning rate; "
                         "budget: then the default run's GRPO step budget")
    ap.add_argument("--budget-method", default="emo_r3", help="the --algo whose step budget --stage budget chooses")
    ap.add_argument("--budget-steps", default="25,50,75,100,125,150", help="GRPO step counts, ascending")
    ap.add_argument("--budget-max", type=int, default=75,
                    help="the largest count the default run's time allows (RESULTS.md says how it was measured)")
    ap.add_argument("--results-md", default="", help="also write the record into this RESULTS.md (empty: nowhere)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run (put last)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    steps_grid = [int(s) for s in a.sft_steps.split(",") if s]
    lrs = [lr for lr in a.lrs.split(",") if lr]
    methods = [m for m in a.methods.split(",") if m]
    budget_grid = [int(k) for k in a.budget_steps.split(",") if k]
    grpo_steps = parse_args(a.extra, "selection", "").grpo.steps
    rec: dict = {"command": "python benchmarks/selection.py " + " ".join(argv), "seeds": seeds,
                 "sft_steps": steps_grid, "lrs": lrs, "grpo_steps": grpo_steps, "sft": {}, "sft_choice": None,
                 "grpo": {}, "lr_choice": {},
                 "started": time.time()}
    if a.stage == "budget":
        rec.update(budget_method=a.budget_method, budget_steps=budget_grid, budget_max=a.budget_max, budget={},
                   budget_choice=None)
    a.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        rec["ended"] = time.time()
        (a.out / "selection.json").write_text(json.dumps(rec, indent=2))
        (a.out / "selection.md").write_text(report(rec) + "\n")

    claims = a.out / "claims"

    def sft_dir(steps: int, seed: int) -> Path:
        return a.out / "sft" / f"steps{steps}" / f"seed{seed}"

    def budget_dir(seed: int) -> Path:
        return a.out / "budget" / a.budget_method / f"seed{seed}"

    def collect() -> None:  # the record from the points on disk, whichever process ran them
        ran: set[int] = set()
        for steps in steps_grid:
            for seed in seeds:
                acc = finished(sft_dir(steps, seed) / "eval" / "results.json", "sft")
                if acc is not None:
                    rec["sft"].setdefault(str(steps), {})[str(seed)] = acc
        for algo in methods:
            for lr in lrs:
                for seed in seeds:
                    acc = finished(a.out / algo / f"lr{lr}" / f"seed{seed}" / "results.json", algo)
                    if acc is not None:
                        rec["grpo"].setdefault(algo, {}).setdefault(lr, {})[str(seed)] = acc
                        ran.add(ran_steps(a.out / algo / f"lr{lr}" / f"seed{seed}"))
        if len(ran) > 1:
            raise RuntimeError(f"{a.out}: the learning-rate grid's points ran different step counts {sorted(ran)}")
        if ran:  # the budget the points ran, whatever today's default (collected points may predate it)
            rec["grpo_steps"] = ran.pop()
        if a.stage == "budget":
            for k in budget_grid:
                for seed in seeds:
                    acc = finished(budget_dir(seed) / f"eval-{k}" / "results.json", "model")
                    if acc is not None:
                        rec["budget"].setdefault(str(k), {})[str(seed)] = acc

    def point(run):  # run one point, then record every finished point
        def go() -> None:
            run()
            collect()
            save()
        return go

    def decide() -> None:  # the choice of each grid whose every point is on disk (all seeds)
        if all(len(rec["sft"].get(str(s), {})) == len(seeds) for s in steps_grid):
            rec["sft_choice"] = choose(steps_grid, {s: list(rec["sft"][str(s)].values()) for s in steps_grid})
        for algo in methods:
            if all(len(rec["grpo"].get(algo, {}).get(lr, {})) == len(seeds) for lr in lrs):
                rec["lr_choice"][algo] = choose(lrs, {lr: list(rec["grpo"][algo][lr].values()) for lr in lrs})
        fits = [k for k in budget_grid if k <= a.budget_max]
        if a.stage == "budget" and fits and all(len(rec["budget"].get(str(k), {})) == len(seeds) for k in budget_grid):
            rec["budget_choice"] = choose(fits, {k: list(rec["budget"][str(k)].values()) for k in fits})
        save()

    def run_grid() -> None:
        # 1. Cold-Start SFT's curve on validation
        run_points([(f"sft-{steps}-{seed}", sft_dir(steps, seed) / "eval" / "results.json",
                     point(lambda steps=steps, seed=seed: sft_point(seed, steps, sft_dir(steps, seed), a.extra)))
                    for steps in steps_grid for seed in seeds], claims)
        collect()
        decide()  # run_points returns once every point is done: the Cold-Start grid is complete
        if rec["sft_choice"] is None:
            raise RuntimeError(f"{a.out}: a Cold-Start grid point has no validation result; no step count chosen")
        if a.stage != "sft":  # 2. each method's learning rate, from the chosen Cold-Start checkpoint of each seed
            run_points([(f"{algo}-{lr}-{seed}", a.out / algo / f"lr{lr}" / f"seed{seed}" / "results.json",
                         point(lambda algo=algo, lr=lr, seed=seed: grpo_point(
                             algo, lr, seed, sft_dir(rec["sft_choice"], seed) / "sft",
                             a.out / algo / f"lr{lr}" / f"seed{seed}", a.extra)))
                        for algo in methods for lr in lrs for seed in seeds], claims)
            collect()
            decide()
        if a.stage == "budget":  # 3. the default run's step budget, at the method's chosen rate
            algo = a.budget_method
            if algo not in rec["lr_choice"]:
                raise RuntimeError(f"{a.out}: no learning rate chosen for {algo}; add it to --methods")
            run_points([(f"budget-{algo}-{seed}", budget_dir(seed) / f"eval-{max(budget_grid)}" / "results.json",
                         point(lambda seed=seed: budget_point(
                             algo, rec["lr_choice"][algo], seed, sft_dir(rec["sft_choice"], seed) / "sft",
                             budget_dir(seed), budget_grid, a.extra)))
                        for seed in seeds], claims)
            collect()
            decide()

    if a.collect:  # run nothing: the record of the points on disk, and a choice only where a grid is complete
        collect()
        decide()
    else:
        run_grid()
    text = report(rec)
    if a.results_md:
        write_results_md(Path(a.results_md), text)
    print(text)
    return rec


if __name__ == "__main__":
    main()
