"""python -m emor3.evaluate: accuracy of a checkpoint on several datasets, as the paper's table.

Protocol (docs/method.md "Data and protocol"): one sampled answer per image at temperature 0.6, top-p 0.95, no
reflection; accuracy is the hard match of the last boxed answer with the label (lower-cased). The prompt lists the
evaluated set's own taxonomy labels. Each set is in-domain or out-of-domain; within one run, ``run A^I`` is the mean
accuracy of its in-domain sets, ``run A^O`` of its out-of-domain sets, ``run A`` of all of them. These are not the
paper's A^I / A^O / A, which average over two training settings (EmoSet-trained and Emotion6-trained): that table
is ``python -m emor3.evaluate table RUN_A RUN_B ...`` (``paper_table``), built from the runs' results.json. Also
reported per set: the format rate (the paper's rule), and on EmoScenes, which keeps each image's true cues, what the
reasoning says against the truth (``reply_scores``):
- ``no_step1``: the share of answers without a parseable step 1. The grounding rates below are taken over the
  answers that have one, so an answer that loses the format is counted here and never as 0 % hallucination;
- ``cue_recall``: the share of the image's cue kinds (face, sky, object) whose true value step 1 names, and
  ``hallucinated``: the share of cue kinds for which step 1 claims a value that is not in the image; both also per
  cue kind (``cue_recall_by_kind``, ``hallucinated_by_kind``): the visual-text consistency RER's first judge rewards;
- ``step3_correct``: the share of answers with a step 3 whose stated valence and arousal are the scene's (a step 3
  that states neither is not correct);
- ``agreement``: the share of answers with a step 3 and a boxed label of the set's taxonomy whose label has the
  valence and arousal step 3 concluded: the answer-reasoning coherence RER's second judge rewards;
- on the shortcut variant, ``accuracy_badge_agrees`` / ``accuracy_badge_disagrees``: accuracy where the badge shows
  the scene's rule label and where it does not (results.json only; a badge reader scores high and low).

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
from emor3.engine.prompts import encode_samples
from emor3.engine.sampler import sample
from emor3.run_folder import prepare_run_dir
from emor3.stages.build import EvalSet, Run, build, eval_requests
from emor3.folders import run_cli, wants_debug
from emor3.models.checkpoint import fault_point
from emor3.rewards import accuracy_reward, format_reward, parse_set
from emor3.rewards.set_parse import SetParse
from emor3.toy.emoscenes import cue_mentions, scene_properties, step3_claims
from emor3.toy.world import WORLD


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


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom, by the finite series of Abramowitz &
    Stegun 26.7.3 (odd df) and 26.7.4 (even df), exact up to rounding."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        s, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):  # cos(th) (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ...)
            s += term
            term *= c2 * (2 * k) / (2 * k + 1)
        a = (2 / math.pi) * (theta + math.sin(theta) * s) if df > 1 else (2 / math.pi) * theta
    else:
        s, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...
            s += term
            term *= c2 * (2 * k - 1) / (2 * k)
        a = math.sin(theta) * s
    return 0.5 + a / 2  # a = P(|T| <= |t|) with the sign of t


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on ``_t_cdf``; t_{0.975, 4} =
    2.7764)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _paired_differences(a: Sequence[float], b: Sequence[float], caller: str) -> tuple[int, float, float]:
    """(n, mean, sample standard deviation) of the paired differences a_i - b_i; an error naming ``caller`` unless
    the lists are equally long with at least 2 pairs."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"{caller} needs two equally long lists of >= 2 pairs, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    return n, mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))


def paired_t_interval(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences a_i - b_i and its Student-t interval (mean +- t_{n-1} s / sqrt(n)): exact
    when the differences are normal, and wider than the percentile bootstrap with few pairs, which takes the
    spread of the n values as the spread of their mean's distribution and so covers less than it claims."""
    n, mean, sd = _paired_differences(a, b, "paired_t_interval")
    half = t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Paired Student-t test of the differences a_i - b_i against 0: (mean, t, two-sided p), p = P(|T_{n-1}| >=
    |t|). Differences that are all equal give t = +-inf and p = 0 (or t = 0 and p = 1 when they are all 0)."""
    n, mean, sd = _paired_differences(a, b, "paired_t_test")
    if sd == 0:
        return mean, math.copysign(math.inf, mean) if mean else 0.0, 0.0 if mean else 1.0
    t = mean / (sd / math.sqrt(n))
    return mean, t, min(1.0, 2 * (1 - _t_cdf(abs(t), n - 1)))


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values, in their order: the i-th smallest becomes
    max over j <= i of min(1, (m - j + 1) p_(j)). A hypothesis is rejected at level alpha when its adjusted p is
    below alpha; the family-wise error rate stays at alpha whatever the dependence between the tests."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def sign_test(a: Sequence[float], b: Sequence[float]) -> tuple[int, int, float]:
    """Exact two-sided sign test of the paired differences a_i - b_i: (positive, non-zero, p), p = P(a count at
    least as far from n/2 as the one seen | each sign +- with probability 1/2); zero differences are left out. It
    assumes nothing about the size of the differences: 5 positive of 5 gives p = 2 / 32 = 0.0625."""
    if len(a) != len(b):
        raise ValueError(f"sign_test needs two equally long lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b) if x != y]
    n, k = len(d), sum(x > 0 for x in d)
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return k, n, min(1.0, 2 * tail)


def cue_scores(step1: str, sample) -> tuple[float, float] | None:
    """(cue recall, hallucinated-cue rate) of step 1 against the sample's true cues (EmoScenes only; None where no
    cues are recorded): the share of cue kinds whose true value is named, and the share for which an absent value
    is claimed (``emor3.toy.emoscenes.CueMentions``)."""
    cues = _cues(sample)
    if not cues:
        return None
    m = cue_mentions(step1, cues)
    return m.recall, m.hallucination


CUE_KINDS = ("face", "sky", "object")


def _cues(sample) -> dict | None:
    return sample.metadata.get("cues") if isinstance(sample.metadata, dict) else None


def reply_scores(parsed: SetParse, sample, taxonomy=None, correct: bool | None = None) -> dict | None:
    """One reply against its scene's truth (EmoScenes only: None where the sample records no cues):
    ``step1`` (does step 1 parse), per cue kind ``named`` and ``wrong`` (None without a step 1), ``step3_correct``
    (None without a step 3) and ``agreement`` (None without a step 3 or without a boxed label of ``taxonomy`` that
    has a valence and an arousal). Module docstring: what each measures. On the shortcut variant also
    ``badge_agrees`` (does the badge show the scene's rule label) with ``correct`` (the reply's accuracy, as given),
    so accuracy can be split by whether the shortcut agrees with the cues; None elsewhere."""
    cues = _cues(sample)
    if not cues:
        return None
    badge = sample.metadata.get("shortcut")
    out: dict = {"step1": parsed.step1 is not None, "named": None, "wrong": None, "step3_correct": None,
                 "agreement": None, "correct": correct,
                 "badge_agrees": None if badge is None else badge == sample.metadata.get("rule_label", sample.label)}
    if parsed.step1 is not None:
        m = cue_mentions(parsed.step1, cues)
        out["named"], out["wrong"] = dict(m.named), m.wrong_kinds
    if parsed.step3 is not None:
        stated = step3_claims(parsed.step3)
        if {"face", "sky"} <= set(cues):
            out["step3_correct"] = stated == scene_properties(cues)
        label = (parsed.answer or "").strip().lower()
        if taxonomy is not None and label in taxonomy.labels and taxonomy.arousal.get(label) is not None:
            out["agreement"] = stated == (taxonomy.valence[label], taxonomy.arousal[label])
    return out


def evaluate(model, processor, sets: Sequence[EvalSet], taxonomies: dict, cfg: EvalConfig, *, seed: int = 0,
             device="cpu", progress: bool = True, grounding: bool = True) -> dict:
    """Accuracy with its Wilson interval and format rate of ``model`` on each set, and with ``grounding`` what the
    replies of samples that carry cues say against the truth (``reply_scores``, aggregated by ``set_row``), plus the
    run's averages and their intervals."""
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    results: dict = {"sets": {}}
    for s in sets:
        correct = formatted = 0
        replies: list[dict] = []
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
                right = accuracy_reward(text, smp.label)
                correct += right
                formatted += format_reward(text)
                if grounding:
                    r = reply_scores(parse_set(text), smp, taxonomies.get(smp.taxonomy), correct=right == 1.0)
                    if r is not None:
                        replies.append(r)
        results["sets"][s.name] = set_row(s.domain, correct, len(s.samples), formatted, replies=replies)
        fault_point(f"evaluated set {s.name}")  # a crash-test hook (checkpoint.fault_point)
    results.update(summary_scores(results["sets"]))
    results.update(summary_intervals(results["sets"]))
    return results


def _pct(xs) -> float | None:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else None


def set_row(domain: str, correct: int, n: int, formatted: int, recalls: Sequence[float] = (),
            hallucinated: Sequence[float] = (), *, replies: Sequence[dict] = ()) -> dict:
    """One evaluated set's entry of results.json: counts, accuracy (%) and its Wilson interval, format rate, and
    (%, None where no sample carries cues) the grounding and reasoning rates of the module docstring, from
    ``replies`` (``reply_scores`` of each reply whose sample has cues). ``recalls`` / ``hallucinated``: per-answer
    rates given directly instead (no per-kind or reasoning columns then)."""
    lo, hi = wilson_interval(correct, n)
    row = {"domain": domain, "n": n, "correct": correct, "accuracy": 100.0 * correct / max(1, n),
           "accuracy_ci": [lo, hi], "format_rate": 100.0 * formatted / max(1, n),
           "cue_recall": _pct(recalls), "hallucinated": _pct(hallucinated)}
    if not replies:
        return row
    with1 = [r for r in replies if r["step1"]]
    step3 = [r["step3_correct"] for r in replies if r["step3_correct"] is not None]
    agree = [r["agreement"] for r in replies if r["agreement"] is not None]
    kinds = [k for k in CUE_KINDS if any(k in r["named"] for r in with1)]
    row.update({
        "n_cued": len(replies), "no_step1": _pct(not r["step1"] for r in replies), "n_step1": len(with1),
        "cue_recall": _pct(sum(r["named"].values()) / max(1, len(r["named"])) for r in with1),
        "hallucinated": _pct(sum(r["wrong"].values()) / max(1, len(r["wrong"])) for r in with1),
        "cue_recall_by_kind": {k: _pct(r["named"][k] for r in with1 if k in r["named"]) for k in kinds},
        "hallucinated_by_kind": {k: _pct(r["wrong"][k] for r in with1 if k in r["wrong"]) for k in kinds},
        "n_step3": len(step3), "step3_correct": _pct(step3), "n_agreement": len(agree), "agreement": _pct(agree)})
    badged = [r for r in replies if r.get("badge_agrees") is not None and r.get("correct") is not None]
    if badged:  # the shortcut variant: accuracy where the badge shows the rule label and where it does not
        for key, agrees in (("badge_agrees", True), ("badge_disagrees", False)):
            part = [r["correct"] for r in badged if r["badge_agrees"] is agrees]
            row.update({f"n_{key}": len(part), f"accuracy_{key}": _pct(part)})
    return row


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


# the grounding and reasoning columns of the table after the accuracies: (header, results.json key)
GROUNDING_COLUMNS = (("format %", "format_rate"), ("no step 1 %", "no_step1"), ("cue recall %", "cue_recall"),
                     ("hallucinated cues %", "hallucinated"), ("recall face/sky/object %", "cue_recall_by_kind"),
                     ("hallucinated face/sky/object %", "hallucinated_by_kind"), ("step 3 correct %", "step3_correct"),
                     ("answer agrees with step 3 %", "agreement"))


def set_means(sets) -> dict:
    """Each grounding column's mean over the sets that have it (per-kind columns: per kind); None where none has."""
    sets = list(sets)
    out = {}
    for _, key in GROUNDING_COLUMNS:
        if key.endswith("_by_kind"):
            per = {k: _mean([v[key][k] for v in sets if (v.get(key) or {}).get(k) is not None]) for k in CUE_KINDS}
            out[key] = per if any(x is not None for x in per.values()) else None
        else:
            out[key] = _mean([v[key] for v in sets if v.get(key) is not None])
    return out


def fmt_cell(x) -> str:
    """A table cell: "12.34", "–" for none, and "a / b / c" for a per-kind value (face, sky, object)."""
    if isinstance(x, dict):
        return " / ".join(_fmt(x.get(k)) for k in CUE_KINDS)
    return _fmt(x)


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per evaluated model (e.g. "Cold-Start SFT", "EMO-R3"), columns as the paper's:
    every set's accuracy (in-domain marked ^I) with its 95 % interval, then the run's averages; then the format rate
    and the grounding and reasoning rates (``GROUNDING_COLUMNS``; means over the sets that carry them)."""
    first = next(iter(rows.values()))
    names = list(first["sets"])
    head = [n + ("^I" if first["sets"][n]["domain"] == "in" else "") for n in names]
    tail = " | " + " | ".join(h for h, _ in GROUNDING_COLUMNS) + " |"
    lines = ["| Model | " + " | ".join(head + list(RUN_AVERAGES)) + tail,
             "|---" * (len(names) + len(RUN_AVERAGES) + len(GROUNDING_COLUMNS) + 1) + "|"]
    for model_name, r in rows.items():
        sets = r["sets"]
        means = set_means(sets.values())
        cells = [_fmt_ci(sets[n]["accuracy"], sets[n].get("accuracy_ci")) for n in names]
        cells += [_fmt_ci(r.get(k), r.get(k + "_ci")) for k in RUN_AVERAGES]
        cells += [fmt_cell(means[key]) for _, key in GROUNDING_COLUMNS]
        lines.append(f"| {model_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: dict[str, dict], out: Path) -> str:
    table = format_table(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(table + "\n")
    return table


def evaluate_baseline(cfg: Config, run: Run, model, out: Path, *, resumed: bool = False) -> dict | None:
    """The row of ``model``, the point GRPO starts from (the Cold-Start checkpoint, or the initial model), in the
    final table, evaluated once per run into ``RUN_DIR/baseline_results.json``; a resumed run reads it back. None
    without eval sets."""
    path = out / "baseline_results.json"
    if resumed and path.is_file():  # evaluated when the run started
        return json.loads(path.read_text())
    if not run.eval_sets:
        return None
    results = evaluate(model, run.processor, run.eval_sets, run.taxonomies, cfg.eval, seed=cfg.run.seed,
                       device=run.device, progress=cfg.run.progress)
    results["name"] = "Cold-Start SFT" if (out / "sft").is_dir() else "initial"
    path.write_text(json.dumps(results, indent=2))
    return results


def evaluate_run(cfg: Config, run: Run, model, out: Path, baseline: dict | None = None) -> dict:
    """Evaluate ``model``, a run's trained policy, and print the table, the ``baseline`` row (if any) first."""
    rows = {}
    names = [s.name for s in run.eval_sets]
    if baseline is not None and list(baseline.get("sets", {})) != names:  # the run's evaluation sets changed
        print(f"[emor3] the baseline row was evaluated on {', '.join(baseline.get('sets', {})) or 'no set'}, not "
              f"on {', '.join(names)}: it is left out of the table")
        baseline = None
    if baseline is not None:
        rows[baseline.get("name", "baseline")] = baseline
    rows[cfg.grpo.algo] = evaluate(model, run.processor, run.eval_sets, run.taxonomies, cfg.eval,
                                   seed=cfg.run.seed, device=run.device, progress=cfg.run.progress)
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
    eval_requests(cfg.data.eval, cfg.data.train, WORLD)  # refused settings are refused before a file is touched
    out = prepare_run_dir(cfg, "python -m emor3.evaluate")  # refuses a folder holding a run; locks it
    run = build(cfg.resolved(), out, WORLD)
    name = Path(cfg.model.path).name if cfg.model.path else "model"
    rows = {name: evaluate(run.model, run.processor, run.eval_sets, run.taxonomies, cfg.eval, seed=cfg.run.seed,
                           device=run.device, progress=cfg.run.progress)}
    print(write_results(rows, out))
    return rows


if __name__ == "__main__":
    main()
