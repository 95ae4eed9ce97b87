"""python -m emor3.evaluate: accuracy of a checkpoint on several datasets, as the paper's table.

Protocol (docs/method.md "Data and protocol"): one sampled answer per image at temperature 0.6, top-p 0.95, no
reflection; accuracy is the hard match of the last boxed answer with the label (lower-cased). The prompt lists the
evaluated set's own taxonomy labels. Each set is in-domain or out-of-domain; A^I is the mean accuracy of the
in-domain sets, A^O of the out-of-domain sets, A of all of them. Also reported per set: the format rate (the paper's
rule), and on EmoScenes how often step 1 names cues that are really in the image (``cue_rate``) — the
visual-text consistency that RER is meant to improve, measurable here because EmoScenes keeps its true cues.

Results are printed as a markdown table and written to ``RUN_DIR/results.json`` and ``RUN_DIR/results.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from emor3.config import Config, EvalConfig, parse_args
from emor3.data.emoscenes import cue_mentions
from emor3.engine.prompts import encode_samples
from emor3.engine.sampler import sample
from emor3.experiment import EvalSet, Experiment, build_experiment
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


def summary_scores(per_set: dict) -> dict:
    """A^I (mean accuracy of in-domain sets), A^O (out-of-domain), A (all), as the paper's table."""
    acc_in = [v["accuracy"] for v in per_set.values() if v["domain"] == "in"]
    acc_out = [v["accuracy"] for v in per_set.values() if v["domain"] == "out"]
    return {"A^I": _mean(acc_in), "A^O": _mean(acc_out), "A": _mean(acc_in + acc_out)}


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per evaluated model (e.g. "Cold-Start SFT", "EMO-R3"), columns as the paper's:
    every set's accuracy (in-domain marked ^I), then A^I, A^O, A; then format and cue rates."""
    first = next(iter(rows.values()))
    names = list(first["sets"])
    head = [n + ("^I" if first["sets"][n]["domain"] == "in" else "") for n in names]
    lines = ["| Model | " + " | ".join(head) + " | A^I | A^O | A | format % | cue % |",
             "|---" * (len(names) + 6) + "|"]
    for model_name, r in rows.items():
        sets = r["sets"]
        fmt_rate = _mean([v["format_rate"] for v in sets.values()])
        cues = [v["cue_rate"] for v in sets.values() if v["cue_rate"] is not None]
        cells = [_fmt(sets[n]["accuracy"]) for n in names] + [_fmt(r["A^I"]), _fmt(r["A^O"]), _fmt(r["A"]),
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


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, "python -m emor3.evaluate", (__doc__ or "").strip())
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    exp = build_experiment(cfg, out, fresh_run=False)
    name = Path(cfg.model.path).name if cfg.model.path else "model"
    rows = {name: evaluate(exp.model, exp.processor, exp.eval_sets, exp.taxonomies, cfg.eval, seed=cfg.run.seed,
                           device=exp.device, progress=cfg.run.progress, cue_rate_fn=cue_rate)}
    print(write_results(rows, out))


if __name__ == "__main__":
    main()
