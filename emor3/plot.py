"""python -m emor3.plot RUN_DIR: draw a run's training curves (metrics.jsonl) to RUN_DIR/curves.png.

One small panel per metric, a grid of them, drawn with pillow (already a dependency), so plotting needs nothing
more. ``--metrics a,b,c`` picks the panels (default: the reward parts, accuracy, KL, entropy, clip fractions,
lengths and step time); ``--smooth K`` draws a K-step moving average over the raw curve.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

DEFAULT_METRICS = (
    "reward/total", "accuracy", "format_rate", "reward/consistency", "reward/coherence", "kl", "entropy",
    "clip_frac_high", "clip_frac_low", "grad_norm", "completion_len_mean", "time/step",
)
PANEL_W, PANEL_H, MARGIN = 320, 200, 36


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    return rows


def _smooth(ys: list[float], k: int) -> list[float]:
    out, window = [], []
    for y in ys:
        window = (window + [y])[-k:]
        out.append(sum(window) / len(window))
    return out


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int], name: str, xs: list, ys: list, smooth: int, font):
    x0, y0 = box
    left, top, right, bottom = x0 + MARGIN, y0 + 22, x0 + PANEL_W - 10, y0 + PANEL_H - 22
    draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    draw.text((x0 + 6, y0 + 4), name, fill=(0, 0, 0), font=font)
    pts = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
    if not pts:
        draw.text((left + 8, top + 8), "no data", fill=(150, 0, 0), font=font)
        return
    lo, hi = min(y for _, y in pts), max(y for _, y in pts)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    xlo, xhi = pts[0][0], max(pts[-1][0], pts[0][0] + 1)

    def at(x, y):
        return (left + (x - xlo) / (xhi - xlo) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))

    curves = [([y for _, y in pts], (170, 200, 235), 1)]
    if smooth > 1:
        curves.append((_smooth([y for _, y in pts], smooth), (20, 80, 180), 2))
    else:
        curves[0] = (curves[0][0], (20, 80, 180), 2)
    for values, colour, width in curves:
        line = [at(x, y) for (x, _), y in zip(pts, values)]
        draw.line(line if len(line) > 1 else line * 2, fill=colour, width=width)
    draw.text((x0 + 2, top - 4), f"{hi:.3g}", fill=(80, 80, 80), font=font)
    draw.text((x0 + 2, bottom - 8), f"{lo:.3g}", fill=(80, 80, 80), font=font)
    draw.text((left, bottom + 4), f"step {xlo}", fill=(80, 80, 80), font=font)
    draw.text((right - 60, bottom + 4), f"{xhi}", fill=(80, 80, 80), font=font)


def plot_run(run_dir: Path, metrics: tuple[str, ...] = DEFAULT_METRICS, smooth: int = 1, out: Path | None = None) -> Path:
    rows = read_metrics(run_dir)
    present = [m for m in metrics if any(m in r for r in rows)]
    if not present:
        raise ValueError(f"{run_dir}/metrics.jsonl has none of the metrics {list(metrics)}")
    cols = min(4, len(present))
    nrows = math.ceil(len(present) / cols)
    img = Image.new("RGB", (cols * PANEL_W, nrows * PANEL_H), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for i, name in enumerate(present):
        xs = [r["step"] for r in rows if name in r]
        ys = [r[name] for r in rows if name in r]
        draw_panel(draw, ((i % cols) * PANEL_W, (i // cols) * PANEL_H), name, xs, ys, smooth, font)
    out = out or run_dir / "curves.png"
    img.save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emor3.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="A run folder holding metrics.jsonl.")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="Comma-separated metric names to draw.")
    p.add_argument("--smooth", type=int, default=1, help="Moving-average window in steps (1: raw curve only).")
    p.add_argument("--out", type=Path, default=None, help="Output PNG (default: RUN_DIR/curves.png).")
    a = p.parse_args(argv)
    try:
        path = plot_run(a.run_dir, tuple(m for m in a.metrics.split(",") if m), a.smooth, a.out)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(path)


if __name__ == "__main__":
    main()
