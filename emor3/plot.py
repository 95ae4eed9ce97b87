"""python -m emor3.plot RUN_DIR: draw a run's training curves (RUN_DIR/metrics.jsonl) to RUN_DIR/curves.png.

Drawn with matplotlib, an optional extra (``pip install 'emor3[plot]'``); without it the command says so and
exits. One panel per group of related metrics, each line one metric key of the train loop's records:
  reward components (total, accuracy, format, consistency, coherence), accuracy and format rate, KL to the
  reference, policy entropy, PPO clip fractions (low, high, dual), completion lengths (mean, max), gradient norm,
  and seconds per phase of a step (rollout, judge, reference, update, stacked; the step total as a line).
A panel whose keys are all missing (e.g. KL in a β = 0 run) is left out. ``--metrics a,b,c`` draws one panel per
named key instead (a named key that no record has is an error); ``--smooth K`` draws a K-step moving average
over the faded raw curve.

A run that crashed mid-write leaves a truncated last line in metrics.jsonl: it is skipped with a warning. A bad line
anywhere else is an error naming the line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

PLOT_EXTRA = "pip install 'emor3[plot]'  (or: pip install matplotlib)"


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # metric keys of metrics.jsonl, one line each
    stacked: tuple[str, ...] = ()  # keys drawn as a stacked area under the lines (time per phase)
    ylabel: str = ""


PANELS = (
    Panel("reward components", ("reward/total", "reward/accuracy", "reward/format", "reward/consistency",
                                "reward/coherence")),
    Panel("accuracy", ("accuracy", "format_rate"), ylabel="fraction of completions"),
    Panel("KL to the reference", ("kl",), ylabel="k3 per token"),
    Panel("entropy", ("entropy",), ylabel="nats per token"),
    Panel("clip fractions", ("clip_frac_low", "clip_frac_high", "clip_frac_dual"), ylabel="fraction of tokens"),
    Panel("completion length", ("completion_len_mean", "completion_len_max"), ylabel="tokens"),
    Panel("gradient norm", ("grad_norm",)),
    Panel("time per phase", ("time/step",), stacked=("time/rollout", "time/judge", "time/reference", "time/update"),
          ylabel="seconds per step"),
)
COLUMNS = 4
PANEL_INCHES = (4.0, 3.0)  # width, height of one panel
DPI = 100


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or an ImportError that names the extra to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"python -m emor3.plot needs matplotlib, which is not installed: {PLOT_EXTRA}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_records(path: Path, valid, what: str) -> list[dict]:
    """The JSON objects of a run's JSONL log (metrics.jsonl, samples.jsonl), one a line. A truncated last line (a
    crash mid-write) is skipped with a warning; a bad line elsewhere, or a record for which ``valid`` is false, is
    an error naming the line (``what`` says what a record must be)."""
    lines = path.read_text(errors="replace").split("\n")
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(numbered) - 1:
                warnings.warn(f"{path}:{n}: skipping the last line, which is not complete JSON (a run stopped while "
                              f"writing it?): {e}", stacklevel=3)
                break
            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(row, dict) or not valid(row):
            raise ValueError(f"{path}:{n}: {what}")
        rows.append(row)
    return rows


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (``read_records``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {path.parent} a run folder?)")
    return read_records(path, lambda r: isinstance(r.get("step"), (int, float)),
                        "a metrics record is a JSON object with a numeric 'step'")


def smooth(ys: list[float], k: int) -> list[float]:
    """Trailing moving average over the last k points (fewer at the start)."""
    out, window = [], []
    for y in ys:
        window = (window + [y])[-k:]
        out.append(sum(window) / len(window))
    return out


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the records that hold a finite number for it."""
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def panels_present(rows: list[dict], panels=PANELS) -> list[Panel]:
    """The panels with at least one key present in the records, each keeping only its present keys."""
    out = []
    for p in panels:
        keys = tuple(k for k in p.keys if series(rows, k)[0])
        stacked = tuple(k for k in p.stacked if series(rows, k)[0])
        if keys or stacked:
            out.append(Panel(p.title, keys, stacked, p.ylabel))
    return out


def make_figure(rows: list[dict], panels=PANELS, smooth_k: int = 1, title: str | None = None):
    """A matplotlib Figure, one axes per present panel in a grid of COLUMNS columns."""
    plt = pyplot()
    drawn = panels_present(rows, panels)
    if not drawn:
        keys = sorted({k for p in panels for k in p.keys + p.stacked})
        raise ValueError(f"the metrics hold none of the keys {keys}")
    cols = min(COLUMNS, len(drawn))
    nrows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * PANEL_INCHES[0], nrows * PANEL_INCHES[1]), dpi=DPI,
                             squeeze=False, layout="constrained")
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, drawn):
        if panel.stacked:
            # phases share the steps where all of them were recorded, so the stack adds up
            steps = sorted(set.intersection(*(set(series(rows, k)[0]) for k in panel.stacked)))
            by_key = {k: dict(zip(*series(rows, k))) for k in panel.stacked}
            ax.stackplot(steps, *[[by_key[k][s] for s in steps] for k in panel.stacked],
                         labels=[k.split("/")[-1] for k in panel.stacked], alpha=0.75)
        for key in panel.keys:
            xs, ys = series(rows, key)
            if smooth_k > 1:
                (raw,) = ax.plot(xs, ys, alpha=0.3, linewidth=1)
                ax.plot(xs, smooth(ys, smooth_k), color=raw.get_color(), linewidth=1.8, label=key)
            else:
                ax.plot(xs, ys, linewidth=1.5, marker="." if len(xs) < 30 else None, label=key)
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(panel.keys) + len(panel.stacked) > 1:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def plot_run(run_dir: Path, panels=PANELS, smooth_k: int = 1, out: Path | None = None,
             title: str | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl to `out` (default RUN_DIR/curves.png); returns the PNG's path."""
    plt = pyplot()
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    try:
        fig = make_figure(rows, panels, smooth_k, title)
    except ValueError as e:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: {e}") from None
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emor3.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="A run folder holding metrics.jsonl.")
    p.add_argument("--metrics", default="", help="Comma-separated metric keys, one panel each (default: the "
                                                 "panels listed above).")
    p.add_argument("--smooth", type=int, default=1, help="Moving-average window in steps (1: raw curve only).")
    p.add_argument("--title", default=None, help="A title over the figure.")
    p.add_argument("--out", type=Path, default=None, help="Output PNG (default: RUN_DIR/curves.png).")
    a = p.parse_args(argv)
    if a.smooth < 1:
        p.error(f"--smooth {a.smooth}: must be at least 1")
    named = [k for k in a.metrics.split(",") if k]
    panels = tuple(Panel(k, (k,)) for k in named) or PANELS
    try:
        if named:  # a key the user names is drawn or refused, never dropped like a default panel's missing key
            path = a.run_dir / "metrics.jsonl"
            rows = read_metrics(path)
            unknown = [k for k in named if not series(rows, k)[0]]
            if unknown:
                known = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
                raise ValueError(f"{path}: --metrics {','.join(unknown)}: no record has "
                                 f"{'this key' if len(unknown) == 1 else 'these keys'}; its keys: {', '.join(known)}")
        path = plot_run(a.run_dir, panels, a.smooth, a.out, a.title)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(path)


if __name__ == "__main__":
    main()
