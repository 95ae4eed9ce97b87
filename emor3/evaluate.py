"""python -m emor3.evaluate: accuracy of a checkpoint on several datasets, as the paper's table.

Protocol (docs/method.md "Data and protocol"): one sampled answer per image at temperature 0.6, top-p 0.95, no
reflection; accuracy is the hard match of the last boxed answer with the label (lower-cased). The prompt lists the
evaluated set's own taxonomy labels. Each set is in-domain or out-of-domain; within one run, ``run A^I`` is the mean
accuracy of its in-domain sets, ``run A^O`` of its out-of-domain sets, ``run A`` of all of them. These are not the
paper's A^I / A^O / A, which average over two training settings (EmoSet-trained and Emotion6-trained): that table
is ``python -m emor3.evaluate table RUN_A RUN_B ...`` (``paper_table``), built from the runs' results.json. Also reported per set: the format rate (the paper's
rule), and on EmoScenes how often step 1 names cues that are really in the image (``cue_rate``) — the
visual-text consistency that RER is meant to improve, measurable here because EmoScenes keeps its true cues.

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
from emor3.experiment import EvalSet, Experiment, build_experiment, exit_on_run_folder_error, prepare_run_dir
from emor3.rewards import accuracy_reward, format_reward, parse_set


def cue_rate(step1: str, sample) -> float | None:
    """Share of the sample's true cues that step 1 names (EmoScenes only; None where no cues are recorded)."""
    cues = sample.metadata.get("cues") if isinstance(sample.metadata, dict) else None
    return cue_mentions(step1, cues).recall if cues else None


def evaluate(model, processor, sets: Sequence[EvalSet], taxonomies: dict, cfg: EvalConfig, *, seed: int = 0,
             device="cpu", progress: bool = True, cue_rate_fn=None) -> dict:
    """Accuracy, format rate (and cue rate where the samples carry cues) of ``model`` on each set, plus A^I, A^O, A.

    ``cue_rate_fn(step1_text, sample) -> float | None``: the share of the sample's true cues that step 1 names (None
    where the sample has no recorded cues)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    results: dict = {"sets": {}}
    for s in sets:
        correct = formatted = 0
        cue_scores: list[float] = []
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
                    if c is not None:
                        cue_scores.append(c)
        n = len(s.samples)
        results["sets"][s.name] = {
            "domain": s.domain, "n": n, "accuracy": 100.0 * correct / max(1, n),
            "format_rate": 100.0 * formatted / max(1, n),
            "cue_rate": 100.0 * sum(cue_scores) / len(cue_scores) if cue_scores else None,
        }
    results.update(summary_scores(results["sets"]))
    return results


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


RUN_AVERAGES = ("run A^I", "run A^O", "run A")  # one run's averages; the paper's A^I / A^O / A are paper_table's


def summary_scores(per_set: dict) -> dict:
    """One run's averages: run A^I (mean accuracy of its in-domain sets), run A^O (out-of-domain), run A (all)."""
    acc_in = [v["accuracy"] for v in per_set.values() if v["domain"] == "in"]
    acc_out = [v["accuracy"] for v in per_set.values() if v["domain"] == "out"]
    return dict(zip(RUN_AVERAGES, (_mean(acc_in), _mean(acc_out), _mean(acc_in + acc_out))))


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per evaluated model (e.g. "Cold-Start SFT", "EMO-R3"), columns as the paper's:
    every set's accuracy (in-domain marked ^I), then the run's averages; then format and cue rates."""
    first = next(iter(rows.values()))
    names = list(first["sets"])
    head = [n + ("^I" if first["sets"][n]["domain"] == "in" else "") for n in names]
    lines = ["| Model | " + " | ".join(head + list(RUN_AVERAGES)) + " | format % | cue % |",
             "|---" * (len(names) + 6) + "|"]
    for model_name, r in rows.items():
        sets = r["sets"]
        fmt_rate = _mean([v["format_rate"] for v in sets.values()])
        cues = [v["cue_rate"] for v in sets.values() if v["cue_rate"] is not None]
        cells = [_fmt(sets[n]["accuracy"]) for n in names] + [_fmt(r.get(k)) for k in RUN_AVERAGES] + [
            _fmt(fmt_rate), _fmt(_mean(cues))]
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
                       device=exp.device, progress=cfg.run.progress, cue_rate_fn=cue_rate)
    results["name"] = "Cold-Start SFT" if (out / "sft").is_dir() else "initial"
    path.write_text(json.dumps(results, indent=2))
    return results


def evaluate_experiment(exp: Experiment, cfg: Config, out: Path, baseline: dict | None = None) -> dict:
    """Evaluate the trained policy of a run and print the table, the ``baseline`` row (if any) first."""
    rows = {}
    if baseline is not None:
        rows[baseline.get("name", "baseline")] = baseline
    rows[cfg.grpo.algo] = evaluate(exp.model, exp.processor, exp.eval_sets, exp.taxonomies, cfg.eval,
                                   seed=cfg.run.seed, device=exp.device, progress=cfg.run.progress, cue_rate_fn=cue_rate)
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
    cfg = parse_args(argv, "python -m emor3.evaluate", (__doc__ or "").strip(), default_out="runs/eval")
    out = exit_on_run_folder_error(prepare_run_dir, cfg, "python -m emor3.evaluate")  # refuses a folder holding a run
    exp = build_experiment(cfg, out)
    name = Path(cfg.model.path).name if cfg.model.path else "model"
    rows = {name: evaluate(exp.model, exp.processor, exp.eval_sets, exp.taxonomies, cfg.eval, seed=cfg.run.seed,
                           device=exp.device, progress=cfg.run.progress, cue_rate_fn=cue_rate)}
    print(write_results(rows, out))


if __name__ == "__main__":
    main()
