"""The mechanism study's precondition, checked on validation: does outcome-only GRPO drift from the cues?

The preregistered rule (benchmarks/RESULTS.md, "Evidence protocol", mechanism study): over at least 3 seeds, GRPO
trained on the EmoScenes variant (``--variant``, default ``conflict``) and evaluated on ``validation`` only must show
at least one of
- its hallucinated-cue rate rising by at least 10 points from its Cold-Start checkpoint to the end of training;
- its answer-step-3 disagreement (100 - ``agreement``) rising by at least 10 points the same way;
- its accuracy where the badge disagrees with the cues at least 15 points below its accuracy where it agrees, at the
  end of training.
Each is read as the mean over the seeds. If none holds, the full study is not run and the benchmark is changed
(never the method).

Per seed, ``python -m emor3.grpo.train --algo grpo`` with that seed's own Cold-Start SFT, at the run's defaults
plus ``--extra``; its results.json holds both ends (the Cold-Start checkpoint and the policy). With ``--sft-from
FOLDER`` a seed's run starts from the Cold-Start checkpoint an earlier precondition run left in
FOLDER/grpo-seed<seed>/sft instead of training its own (as benchmarks/selection.py starts its grid points): for a
new version of the variant whose Cold-Start traces are those of the earlier one, pixel for pixel. Runs in parts and in
several processes as benchmarks/selection.py does (finished seeds are read, not run again; a process claims a seed
before running it; a run stopped by SIGINT or SIGTERM, which checkpoints, is resumed, taking ``--run.threads`` and
``--grpo.steps`` from ``--extra``: a finished run whose results.json is moved away goes on to the larger budget).
The record goes to OUT/precondition.json and .md, and with ``--artifact`` to a committed JSON from which ``--report``
rebuilds the table. ``--rollouts`` counts, in the runs' logged rollouts (``samples.jsonl``), how often the policy
answered the badge's label on conflicting training images, by step window and by how far the badge is from the rule
label.

    python benchmarks/precondition.py --seeds 200,201,202 --out runs/precondition --extra --run.threads 1
    python benchmarks/precondition.py --report benchmarks/mechanism_runs/precondition.json
    python benchmarks/precondition.py --rollouts benchmarks/mechanism_runs/precondition_v3_300 --windows 60,150,300
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import ablation  # benchmarks/ablation.py, beside this script: windowed_replies
import selection  # benchmarks/selection.py, beside this script: run_points, claims
from emor3.config import parse_args
from emor3.grpo.train import train
from emor3.rewards import extract_answer
from emor3.toy.emoscenes import neighbours, rule_label

RISE = 10.0  # points: the hallucinated-cue rate or the disagreement must rise at least this much
GAP = 15.0  # points: accuracy where the badge disagrees must fall at least this far below where it agrees


def ends(run: Path) -> dict:
    """The validation numbers at both ends of one GRPO run: (Cold-Start checkpoint, end of training). A run that
    trained its own Cold-Start names its first row "Cold-Start SFT"; one started from a Cold-Start checkpoint by
    path (``--sft-from``) names it "initial"."""
    res = json.loads((run / "results.json").read_text())
    start, end = (res.get("Cold-Start SFT") or res["initial"])["sets"], res["grpo"]["sets"]
    if set(start) != {"validation"} or set(end) != {"validation"}:
        raise RuntimeError(f"{run}: the precondition reads validation only, the run evaluated {sorted(end)}")
    s, e = start["validation"], end["validation"]

    def dis(row):
        return None if row.get("agreement") is None else 100.0 - row["agreement"]

    return {"accuracy": [s["accuracy"], e["accuracy"]], "hallucinated": [s["hallucinated"], e["hallucinated"]],
            "disagreement": [dis(s), dis(e)], "no_step1": [s.get("no_step1"), e.get("no_step1")],
            "accuracy_badge_agrees": [s.get("accuracy_badge_agrees"), e.get("accuracy_badge_agrees")],
            "accuracy_badge_disagrees": [s.get("accuracy_badge_disagrees"), e.get("accuracy_badge_disagrees")]}


def verdict(per_seed: dict[str, dict]) -> dict:
    """The three criteria as means over seeds, and whether any holds."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return statistics.mean(xs) if xs else None

    def rise(key):
        return mean([r[key][1] - r[key][0] for r in per_seed.values()
                     if r[key][0] is not None and r[key][1] is not None])

    gap = mean([r["accuracy_badge_agrees"][1] - r["accuracy_badge_disagrees"][1] for r in per_seed.values()
                if r["accuracy_badge_agrees"][1] is not None and r["accuracy_badge_disagrees"][1] is not None])
    out = {"hallucinated_rise": rise("hallucinated"), "disagreement_rise": rise("disagreement"), "badge_gap": gap}
    out["holds"] = bool(len(per_seed) >= 3 and (
        (out["hallucinated_rise"] or 0) >= RISE or (out["disagreement_rise"] or 0) >= RISE or (gap or 0) >= GAP))
    return out


def report(rec: dict) -> str:
    per = rec["per_seed"]

    def pair(xs):
        return "–" if xs[0] is None or xs[1] is None else f"{xs[0]:.2f} → {xs[1]:.2f}"

    lines = [f"Command: `{rec['command']}`. Variant `{rec['variant']}`, `validation` only; per seed: the Cold-Start "
             "checkpoint → the GRPO policy at the end.", "",
             "| seed | accuracy | hallucinated cues % | answer disagrees with step 3 % | no step 1 % | "
             "accuracy, badge agrees | accuracy, badge disagrees |", "|---|---|---|---|---|---|---|"]
    for seed in sorted(per, key=int):
        r = per[seed]
        lines.append(f"| {seed} | {pair(r['accuracy'])} | {pair(r['hallucinated'])} | {pair(r['disagreement'])} | "
                     f"{pair(r['no_step1'])} | {pair(r['accuracy_badge_agrees'])} | "
                     f"{pair(r['accuracy_badge_disagrees'])} |")
    v = rec["verdict"]

    def num(x):
        return "–" if x is None else f"{x:+.2f}"

    lines += ["", f"Means over {len(per)} seeds: hallucinated-cue rise {num(v['hallucinated_rise'])} (needs ≥ "
              f"+{RISE:.0f}), disagreement rise {num(v['disagreement_rise'])} (needs ≥ +{RISE:.0f}), accuracy where "
              f"the badge agrees minus where it disagrees at the end {num(v['badge_gap'])} (needs ≥ +{GAP:.0f}). "
              f"Precondition {'holds' if v['holds'] else 'does not hold'}."]
    return "\n".join(lines)


def rollout_counts(samples: Path, windows: list[int]) -> list[dict]:
    """Counts over one run's logged rollouts, per step window (``windows`` are the windows' last steps, ascending;
    a window holds the steps after the previous one's). A reply is to a *conflicting* image when the training label
    (the badge's) is not the rule label of its cues; it *answers the badge* when its boxed label is the training
    label. The badge is a neighbour of the rule label (one of valence, arousal, family changed) or farther. A *wrong*
    answer is a boxed answer other than the rule label, on any image."""
    out = [{"steps": [lo + 1, hi], "replies": 0, "conflicting": 0, "badge": 0, "neighbour_conflicting": 0,
            "neighbour_badge": 0, "far_conflicting": 0, "far_badge": 0, "wrong": 0, "wrong_neighbour": 0}
           for lo, hi in zip([0, *windows], windows)]
    for i, r in ablation.windowed_replies(samples, windows):
        c = out[i]
        rule, answer = rule_label(r["cues"]), extract_answer(r["completion"], normalized=True)
        c["replies"] += 1
        if answer is not None and answer != rule:
            c["wrong"] += 1
            c["wrong_neighbour"] += answer in neighbours(rule)
        if r["label"] == rule:
            continue
        kind = "neighbour" if r["label"] in neighbours(rule) else "far"
        hit = answer == r["label"]
        c["conflicting"] += 1
        c["badge"] += hit
        c[f"{kind}_conflicting"] += 1
        c[f"{kind}_badge"] += hit
    return out


def rollouts_report(folder: Path, windows: list[int] | None = None) -> str:
    """The table of ``rollout_counts`` for every ``seed*/samples.jsonl`` under ``folder``, and each window's sum;
    without ``windows``, one window up to the last logged step."""
    seeds = sorted(folder.glob("seed*/samples.jsonl"), key=lambda p: int(p.parent.name[4:]))
    if not seeds:
        raise SystemExit(f"{folder}: no seed*/samples.jsonl")
    if not windows:
        windows = [max(json.loads(line)["step"] for p in seeds for line in p.read_text().splitlines() if line)]
    per = {p.parent.name[4:]: rollout_counts(p, windows) for p in seeds}
    lines = [f"Rollouts: `python benchmarks/precondition.py --rollouts {folder.as_posix()} --windows "
             f"{','.join(map(str, windows))}` (the logged replies in each seed's `samples.jsonl`). Badge answers are "
             "replies to conflicting training images whose boxed label is the badge's; wrong answers are boxed "
             "answers other than the rule label, on any image.", "",
             "| seed | steps | replies | badge answers / conflicting replies | badge a neighbour | badge farther | "
             "wrong answers | of which a neighbour |", "|---|---|---|---|---|---|---|---|"]
    for i in range(len(windows)):
        rows = [(seed, counts[i]) for seed, counts in per.items()]
        total = {k: sum(c[k] for _, c in rows) for k in rows[0][1] if k != "steps"}
        lo, hi = rows[0][1]["steps"]
        for seed, c in [*rows, ("all", total)]:
            name = f"**{seed}**" if seed == "all" else seed
            lines.append(f"| {name} | {lo}-{hi} | {c['replies']} | {c['badge']} / {c['conflicting']} | "
                         f"{c['neighbour_badge']} / {c['neighbour_conflicting']} | {c['far_badge']} / "
                         f"{c['far_conflicting']} | {c['wrong']} | {c['wrong_neighbour']} |")
    return "\n".join(lines)


def resume_flags(extra: list[str]) -> list[str]:
    """The flags of ``--extra`` that a resumed run takes: the thread count, and the GRPO step count, so that a
    finished run whose results.json was set aside goes on to a larger ``--grpo.steps`` (at the constant default
    learning rate, the same run as one trained that long from the start). Every other setting is the run's own."""
    out = []
    for flag in ("--run.threads", "--grpo.steps"):
        if flag in extra:
            out += extra[extra.index(flag):][:2]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="200,201,202", help="comma-separated seeds (not reporting seeds)")
    ap.add_argument("--variant", default="conflict", help="the EmoScenes variant (--data.emoscenes-variant)")
    ap.add_argument("--out", type=Path, default=Path("runs/precondition"))
    ap.add_argument("--artifact", type=Path, default=None, help="also write the record to this JSON (committed)")
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="run nothing: print the table of a record written with --artifact")
    ap.add_argument("--sft-from", type=Path, default=None, metavar="FOLDER",
                    help="start each seed from FOLDER/grpo-seed<seed>/sft, an earlier run's Cold-Start checkpoint")
    ap.add_argument("--rollouts", type=Path, default=None, metavar="FOLDER",
                    help="run nothing: count badge answers in FOLDER/seed*/samples.jsonl (the committed rollouts)")
    ap.add_argument("--windows", default="",
                    help="with --rollouts: comma-separated last steps of the step windows (default: one window, "
                         "to the last logged step)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run (put last)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    if a.rollouts:
        text = rollouts_report(a.rollouts, [int(w) for w in a.windows.split(",") if w])
        print(text)
        return {"rollouts": text}
    if a.report:
        rec = json.loads(a.report.read_text())
        print(report(rec))
        return rec
    seeds = [s for s in a.seeds.split(",") if s]
    runs = {s: a.out / f"grpo-seed{s}" for s in seeds}

    def run(seed: str) -> None:
        if (runs[seed] / "latest").is_file():  # stopped by SIGINT / SIGTERM, which checkpoints: go on from there
            train(parse_args(["--resume", str(runs[seed]), "--run.progress", "false", *resume_flags(a.extra)],
                             "precondition", ""))
            return
        start = []
        if a.sft_from:  # from a checkpoint by path, the run keeps the tiny run's loss normaliser (as selection does)
            sft = a.sft_from / f"grpo-seed{seed}" / "sft"
            if not (sft / "config.json").is_file():
                raise SystemExit(f"{sft}: no Cold-Start checkpoint there (--sft-from)")
            start = ["--model.path", str(sft), "--sft.steps", "0", "--grpo.loss-scope", "mini-batch"]
        train(parse_args(["--algo", "grpo", "--seed", seed, "--out", str(runs[seed]), "--run.progress", "false",
                          "--overwrite", "--data.emoscenes-variant", a.variant, *start, *selection.SELECT, *a.extra],
                         "precondition", ""))

    selection.run_points([(f"precondition-{s}", runs[s] / "results.json", lambda s=s: run(s)) for s in seeds],
                         a.out / "claims")
    per_seed = {s: ends(runs[s]) for s in seeds}
    rec = {"command": "python benchmarks/precondition.py " + " ".join(argv), "variant": a.variant,
           "seeds": seeds, "per_seed": per_seed, "verdict": verdict(per_seed)}
    text = report(rec)
    (a.out / "precondition.json").write_text(json.dumps(rec, indent=2))
    (a.out / "precondition.md").write_text(text + "\n")
    if a.artifact:
        a.artifact.parent.mkdir(parents=True, exist_ok=True)
        a.artifact.write_text(json.dumps(rec, indent=2) + "\n")
    print(text)
    return rec


if __name__ == "__main__":
    main()
