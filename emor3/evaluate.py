"""python -m emor3.evaluate: accuracy of a checkpoint on several datasets, as the paper's table.

Protocol (docs/method.md "Data and protocol"): one sampled answer per image at temperature 0.6, top-p 0.95, no
reflection; accuracy is the hard match of the last boxed answer with the label (lower-cased). The prompt lists the
evaluated set's own taxonomy labels. Each set is in-domain or out-of-domain; within one run, ``run A^I`` is the mean
accuracy of its in-domain sets, ``run A^O`` of its out-of-domain sets, ``run A`` of all of them. These are not the
paper's A^I / A^O / A, which average over two training settings (EmoSet-trained and Emotion6-trained): that table
is ``python -m emor3.evaluate table RUN_A RUN_B ...`` (``paper_table``), built from the runs' results.json. Also
reported per set: the format rate (the paper's rule), and on EmoScenes the visual-text consistency that RER is meant
to improve, measurable here because EmoScenes keeps its true cues: ``cue_recall``, the share of the image's cue
kinds (face, sky, object) whose true value step 1 names, and ``hallucinated``, the share of cue kinds for which
step 1 claims a value that is not in the image.

Intervals. Every accuracy comes with its 95 % Wilson score interval from the set's size (``wilson_interval``): with
n = 200 images an accuracy near 30 % is known to about ±6 points, so two rows whose intervals overlap widely are not
shown to differ by one evaluation. The run averages get the Wilson interval at the sets' effective size
(``mean_interval``). The intervals cover sampling noise of the evaluation set only, not the spread over
training seeds (benchmarks/ablation.py measures that).

Results are printed as a markdown table and written to ``RUN_DIR/results.json`` and ``RUN_DIR/results.md``.
``python -m emor3.evaluate table RUN_A RUN_B ...`` lays several runs' results.json out as the paper's Table 1
(``TABLE_USAGE``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from emor3.config import Config, EvalConfig, parse_args
from emor3.data.emoscenes import cue_mentions
from emor3.engine.prompts import encode_samples
from emor3.engine.sampler import sample
from emor3.experiment import EvalSet, Experiment, build_experiment, prepare_run_dir
from emor3.folders import run_cli, wants_debug
from emor3.models.checkpoint import fault_point
from emor3.rewards import accuracy_reward, format_reward, parse_set


Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval, in percent, for k successes out of n (Wilson 1927). (0, 100) when n == 0."""
    if n <= 0:
        return 0.0, 100.0
    if not 0 <= k <= n:  # k may be fractional (``mean_interval``)
        raise ValueError(f"wilson_interval: k={k} successes out of n={n}")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def mean_interval(sets: list[dict], z: float = Z95) -> tuple[float, float] | None:
    """95 % interval (percent) of the mean accuracy of independent sets: the Wilson interval of the mean taken as
    a proportion over the effective size n_eff = m^2 / sum_i 1/n_i (the size at which one proportion has the mean's
    variance when the sets' accuracies are equal; sum_i n_i when their sizes are equal, n for a single set). It
    stays inside [0, 100] and has width at 0 % and 100 %. None if a set lacks its size."""
    if not sets or any(not v.get("n") for v in sets):
        return None
    m = len(sets)
    mean = sum(v["accuracy"] for v in sets) / m / 100.0
    n_eff = m * m / sum(1.0 / v["n"] for v in sets)
    return wilson_interval(min(n_eff, max(0.0, mean * n_eff)), n_eff, z)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences a_i - b_i and its percentile bootstrap interval: the pairs (one per training
    seed, both runs from the same Cold-Start checkpoint) are resampled with replacement ``n_boot`` times with a
    seeded generator. With 5 pairs the interval is coarse (it can only take a few dozen distinct values) and assumes
    the seeds are a fair sample of what a seed does; it says which signs the data support, nothing finer."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    d = torch.tensor([x - y for x, y in zip(a, b)], dtype=torch.float64)  # (n,)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(d), (n_boot, len(d)), generator=g)  # (n_boot, n)
    means = d[idx].mean(dim=1)  # (n_boot,)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return d.mean().item(), lo, hi


def cue_scores(step1: str, sample) -> tuple[float, float] | None:
    """(cue recall, hallucinated-cue rate) of step 1 against the sample's true cues (EmoScenes only; None where no
    cues are recorded): the share of cue kinds whose true value is named, and the share for which an absent value
    is claimed (``emor3.data.emoscenes.CueMentions``)."""
    cues = sample.metadata.get("cues") if isinstance(sample.metadata, dict) else None
    if not cues:
        return None
    m = cue_mentions(step1, cues)
    return m.recall, m.hallucination


def evaluate(model, processor, sets: Sequence[EvalSet], taxonomies: dict, cfg: EvalConfig, *, seed: int = 0,
             device="cpu", progress: bool = True, cue_rate_fn=None) -> dict:
    """Accuracy with its Wilson interval, format rate (and cue recall / hallucinated-cue rate where the samples carry
    cues) of ``model`` on each set, plus the run's averages and their intervals.

    ``cue_rate_fn(step1_text, sample)``: None where the sample has no recorded cues, else the share of its true cues
    that step 1 names, or the pair (that share, the hallucinated-cue rate) that ``cue_scores`` returns."""
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    results: dict = {"sets": {}}
    for s in sets:
        correct = formatted = 0
        recalls: list[float] = []
        hallucinated: list[float] = []
        bar = tqdm(range(0, len(s.samples), cfg.batch_size), desc=f"eval {s.name}", disable=not progress,
                   dynamic_ncols=True, leave=False)
        for start in bar:
            idx = range(start, min(start + cfg.batch_size, len(s.samples)))
            chunk = [s.samples[i] for i in idx]
            batch = encode_samples(processor, chunk, [s.samples.image(i) for i in idx], taxonomies).to(device)
            with torch.no_grad():
                rollout = sample(model, batch, group_size=1, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, stop_token_ids=processor.stop_token_ids,
                                 banned_token_ids=processor.banned_token_ids, generator=generator, tokenizer=processor)
            for text, smp in zip(rollout.texts, chunk):
                text = processor.answer(text)  # a Thinking model's reasoning block is not scored
                correct += accuracy_reward(text, smp.label)
                formatted += format_reward(text)
                if cue_rate_fn is not None:
                    step1 = parse_set(text).step1
                    c = cue_rate_fn(step1 or "", smp)
                    if isinstance(c, tuple):
                        recalls.append(c[0])
                        hallucinated.append(c[1])
                    elif c is not None:
                        recalls.append(c)
        results["sets"][s.name] = set_row(s.domain, correct, len(s.samples), formatted, recalls, hallucinated)
        fault_point(f"evaluated set {s.name}")  # a crash-test hook (checkpoint.fault_point)
    results.update(summary_scores(results["sets"]))
    results.update(summary_intervals(results["sets"]))
    return results


def set_row(domain: str, correct: int, n: int, formatted: int, recalls: Sequence[float] = (),
            hallucinated: Sequence[float] = ()) -> dict:
    """One evaluated set's entry of results.json: counts, accuracy (%) and its Wilson interval, format rate, and the
    mean cue recall / hallucinated-cue rate (%, None where no sample carries cues)."""
    lo, hi = wilson_interval(correct, n)
    pct = (lambda xs: 100.0 * sum(xs) / len(xs) if xs else None)
    return {"domain": domain, "n": n, "correct": correct, "accuracy": 100.0 * correct / max(1, n),
            "accuracy_ci": [lo, hi], "format_rate": 100.0 * formatted / max(1, n),
            "cue_recall": pct(recalls), "hallucinated": pct(hallucinated)}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


RUN_AVERAGES = ("run A^I", "run A^O", "run A")  # one run's averages; the paper's A^I / A^O / A are paper_table's


def summary_scores(per_set: dict) -> dict:
    """One run's averages: run A^I (mean accuracy of its in-domain sets), run A^O (out-of-domain), run A (all)."""
    acc_in = [v["accuracy"] for v in per_set.values() if v["domain"] == "in"]
    acc_out = [v["accuracy"] for v in per_set.values() if v["domain"] == "out"]
    return dict(zip(RUN_AVERAGES, (_mean(acc_in), _mean(acc_out), _mean(acc_in + acc_out))))


def summary_intervals(per_set: dict) -> dict:
    """95 % intervals of the run's averages (``mean_interval``), keyed "run A^I_ci" etc.; None where undefined."""
    sets_in = [v for v in per_set.values() if v["domain"] == "in"]
    sets_out = [v for v in per_set.values() if v["domain"] == "out"]
    out = {}
    for k, vs in zip(RUN_AVERAGES, (sets_in, sets_out, sets_in + sets_out)):
        ci = mean_interval(vs)
        out[k + "_ci"] = None if ci is None else list(ci)
    return out


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _fmt_ci(x, ci) -> str:
    """"41.25 [36.5, 46.2]": a value and its 95 % interval (the value alone where no interval is known)."""
    if ci is None or x is None:
        return _fmt(x)
    return f"{x:.2f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per evaluated model (e.g. "Cold-Start SFT", "EMO-R3"), columns as the paper's:
    every set's accuracy (in-domain marked ^I) with its 95 % interval, then the run's averages; then the format
    rate, the cue recall and the hallucinated-cue rate (means over the sets that carry cues)."""
    first = next(iter(rows.values()))
    names = list(first["sets"])
    head = [n + ("^I" if first["sets"][n]["domain"] == "in" else "") for n in names]
    tail = " | format % | cue recall % | hallucinated cues % |"
    lines = ["| Model | " + " | ".join(head + list(RUN_AVERAGES)) + tail,
             "|---" * (len(names) + 7) + "|"]
    for model_name, r in rows.items():
        sets = r["sets"]
        fmt_rate = _mean([v["format_rate"] for v in sets.values()])
        recall = _mean([v["cue_recall"] for v in sets.values() if v.get("cue_recall") is not None])
        halluc = _mean([v["hallucinated"] for v in sets.values() if v.get("hallucinated") is not None])
        cells = [_fmt_ci(sets[n]["accuracy"], sets[n].get("accuracy_ci")) for n in names]
        cells += [_fmt_ci(r.get(k), r.get(k + "_ci")) for k in RUN_AVERAGES]
        cells += [_fmt(fmt_rate), _fmt(recall), _fmt(halluc)]
        lines.append(f"| {model_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: dict[str, dict], out: Path) -> str:
    table = format_table(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(table + "\n")
    return table


def evaluate_baseline(exp: Experiment, out: Path) -> dict | None:
    """The starting point's row of the final table (the Cold-Start checkpoint, or the initial model), evaluated
    once per run into ``RUN_DIR/baseline_results.json``; a resumed run reads it back. None without eval sets."""
    cfg, path = exp.cfg, out / "baseline_results.json"
    if exp.resume_dir is not None and path.is_file():  # evaluated when the run started
        return json.loads(path.read_text())
    if not exp.eval_sets:
        return None
    results = evaluate(exp.model, exp.processor, exp.eval_sets, exp.taxonomies, cfg.eval, seed=cfg.run.seed,
                       device=exp.device, progress=cfg.run.progress, cue_rate_fn=cue_scores)
    results["name"] = "Cold-Start SFT" if (out / "sft").is_dir() else "initial"
    path.write_text(json.dumps(results, indent=2))
    return results


def evaluate_experiment(exp: Experiment, cfg: Config, out: Path, baseline: dict | None = None) -> dict:
    """Evaluate the trained policy of a run and print the table, the ``baseline`` row (if any) first."""
    rows = {}
    names = [s.name for s in exp.eval_sets]
    if baseline is not None and list(baseline.get("sets", {})) != names:  # the run's evaluation sets changed
        print(f"[emor3] the baseline row was evaluated on {', '.join(baseline.get('sets', {})) or 'no set'}, not "
              f"on {', '.join(names)}: it is left out of the table")
        baseline = None
    if baseline is not None:
        rows[baseline.get("name", "baseline")] = baseline
    rows[cfg.grpo.algo] = evaluate(exp.model, exp.processor, exp.eval_sets, exp.taxonomies, cfg.eval,
                                   seed=cfg.run.seed, device=exp.device, progress=cfg.run.progress, cue_rate_fn=cue_scores)
    table = write_results(rows, out)
    print("\n" + table + "\n")
    return rows


# --------------------------------------------------------------------------------------------- the paper's table

TABLE_USAGE = """python -m emor3.evaluate table RUN [RUN ...] [--rows NAME,NAME] [--out FILE.md]

The paper's Table 1 from two or more runs' results.json: each RUN (a run folder or its results.json) is one
training setting, named by its in-domain set(s) (e.g. a run trained on EmoSet and evaluated on emoset@in,
emotion6@out, webemo@out). Rows are the models in the runs' results.json (e.g. initial, Cold-Start SFT, emo_r3;
--rows picks and orders them); columns are, per setting, its in-domain set(s) (^I) then its out-of-domain sets,
then A^I, A^O and A.

Averaging (the paper's): A^I is the unweighted mean of a row's in-domain accuracies over all settings (2 for the
paper: EmoSet^I, Emo6^I), A^O of its out-of-domain accuracies (4), A of all of them (6); every (setting, set) cell
counts once, whatever the set's size. A row missing a setting gets '–' for that setting's cells and its averages.
A row found in several runs of the same setting is taken from the first and the others are named in a note."""


def load_results(path: str | Path) -> tuple[Path, dict]:
    """(the results.json file, its rows) for a run folder or a results.json path; errors name the file."""
    path = Path(path)
    f = path / "results.json" if path.is_dir() else path
    try:
        rows = json.loads(f.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{f}: no such results.json (RUN is a run folder or its results.json; "
                                "`python -m emor3.evaluate` and training runs write it)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(rows, dict) or not rows:
        raise ValueError(f"{f}: expected an object of rows {{model: {{'sets': ...}}}}")
    for name, r in rows.items():
        sets = r.get("sets") if isinstance(r, dict) else None
        if not isinstance(sets, dict) or not sets:
            raise ValueError(f"{f}: row {name!r} has no 'sets'")
        for set_name, v in sets.items():
            if not isinstance(v, dict) or v.get("domain") not in ("in", "out") or not isinstance(v.get("accuracy"), (int, float)):
                raise ValueError(f"{f}: row {name!r} set {set_name!r} needs a domain 'in' or 'out' and a numeric accuracy")
    return f, rows


def paper_table(runs: Sequence[tuple[str, dict]], rows: Sequence[str] | None = None) -> dict:
    """The paper's two-setting table from runs [(label, results.json rows)] -> {"settings": [{"name", "in",
    "out", "runs"}], "rows": {model: {"cells": [[setting, set, accuracy or None]], "A^I", "A^O", "A"}},
    "notes": [...]}; see ``TABLE_USAGE`` for the layout and the averaging rule."""
    settings: dict[str, dict] = {}
    for label, results in runs:
        first = next(iter(results.values()))["sets"]
        ins = [n for n, v in first.items() if v["domain"] == "in"]
        if not ins:
            raise ValueError(f"{label}: no in-domain set, so its training setting is unknown (evaluate with NAME=PATH@in)")
        st = settings.setdefault("+".join(ins), {"name": "+".join(ins), "in": ins, "out": [], "runs": []})
        st["runs"].append((label, results))
        for r in results.values():
            for n, v in r["sets"].items():
                if v["domain"] == "out" and n not in st["out"]:
                    st["out"].append(n)
    if len(settings) < 2:
        names = ", ".join(settings)
        raise ValueError(f"the paper's table needs runs from two or more training settings; all runs given are "
                         f"trained on {names} (a setting is named by its in-domain sets)")
    models = list(rows) if rows else list(dict.fromkeys(m for st in settings.values() for _, res in st["runs"] for m in res))
    notes, table = [], {}
    for m in models:
        cells, acc_in, acc_out, complete = [], [], [], True
        for st in settings.values():
            found = [(label, res[m]) for label, res in st["runs"] if m in res]
            if len(found) > 1:
                notes.append(f"{m} trained on {st['name']}: taken from {found[0][0]}; also in "
                             + ", ".join(label for label, _ in found[1:]))
            sets = found[0][1]["sets"] if found else {}
            for n in st["in"] + st["out"]:
                v = sets.get(n)
                acc = None if v is None else float(v["accuracy"])
                cells.append([st["name"], n, acc])
                if acc is None:
                    complete = False
                elif v["domain"] == "in":
                    acc_in.append(acc)
                else:
                    acc_out.append(acc)
        if not any(c[2] is not None for c in cells):
            raise ValueError(f"row {m!r} is in none of the runs; rows found: "
                             + ", ".join(dict.fromkeys(k for st in settings.values() for _, res in st["runs"] for k in res)))
        if not complete:
            notes.append(f"{m}: some settings or sets are missing, so its averages are left out")
        table[m] = {"cells": cells, "A^I": _mean(acc_in) if complete else None,
                    "A^O": _mean(acc_out) if complete else None, "A": _mean(acc_in + acc_out) if complete else None}
    info = [{"name": st["name"], "in": st["in"], "out": st["out"], "runs": [label for label, _ in st["runs"]]}
            for st in settings.values()]
    return {"settings": info, "rows": table, "notes": notes}


def format_paper_table(t: dict) -> str:
    """Markdown of ``paper_table``'s result: a line naming the settings, then one row per model."""
    head, k = [], 1
    spans = []
    for st in t["settings"]:
        cols = [n + "^I" for n in st["in"]] + list(st["out"])
        spans.append(f"trained on {st['name']}: columns {k}-{k + len(cols) - 1} ({', '.join(st['runs'])})")
        head += cols
        k += len(cols)
    lines = ["Settings: " + "; ".join(spans) + ".", "",
             "| Model | " + " | ".join(head) + " | A^I | A^O | A |", "|---" * (len(head) + 4) + "|"]
    for m, r in t["rows"].items():
        cells = [_fmt(c[2]) for c in r["cells"]] + [_fmt(r["A^I"]), _fmt(r["A^O"]), _fmt(r["A"])]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [""] + [f"note: {n}" for n in t["notes"]] if t["notes"] else []
    return "\n".join(lines)


def table_main(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="python -m emor3.evaluate table", usage=TABLE_USAGE.split("\n", 1)[0],
                                description=TABLE_USAGE.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run folder or its results.json, one per setting (or more)")
    p.add_argument("--rows", default="", help="comma-separated models to show, in this order (default: all)")
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    try:
        runs = [(str(f), rows) for f, rows in (load_results(r) for r in args.runs)]
        text = format_paper_table(paper_table(runs, [r for r in args.rows.split(",") if r] or None))
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["table"]:
        table_main(argv[1:])
        return
    run_cli(evaluate_main, argv, debug=wants_debug(argv))


def evaluate_main(argv: list[str]) -> dict:
    cfg = parse_args(argv, "python -m emor3.evaluate", (__doc__ or "").strip(), default_out="runs/eval")
    out = prepare_run_dir(cfg, "python -m emor3.evaluate")  # refuses a folder holding a run; locks it
    exp = build_experiment(cfg, out)
    name = Path(cfg.model.path).name if cfg.model.path else "model"
    rows = {name: evaluate(exp.model, exp.processor, exp.eval_sets, exp.taxonomies, cfg.eval, seed=cfg.run.seed,
                           device=exp.device, progress=cfg.run.progress, cue_rate_fn=cue_scores)}
    print(write_results(rows, out))
    return rows


if __name__ == "__main__":
    main()
