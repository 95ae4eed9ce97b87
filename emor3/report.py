"""python -m emor3.report RUN_DIR [--out FILE.html]: one self-contained HTML page of a run, to look at what GRPO did.

The page needs no network and no other file: images and the curves are inlined as base64 data URIs, the style and
the few lines of script are in the page. It shows, from the run folder:
1. the settings (``config.toml``, verbatim, folded);
2. the results table (``results.json``, laid out as ``emor3.evaluate.format_table`` lays out results.md: every
   set's accuracy with its 95 % Wilson interval, the run's averages, format rate, cue recall, hallucinated cues);
3. the training curves (``metrics.jsonl`` drawn by ``emor3.plot.make_figure``, as a PNG; they need matplotlib, the
   ``plot`` extra: without it the page says so);
4. sample cards (``samples.jsonl``, grouped by step): the image, the three SET steps, the boxed answer against the
   label, every reward term, and the RER judge's replies. A filter shows all cards, the correct, the wrong or the
   format failures (format reward 0), and, where the samples carry their true cues (EmoScenes), the cards whose
   step 1 claims a cue value that is not in the image (``emor3.toy.emoscenes.cue_mentions``).
Images are shrunk to ``--thumb`` pixels on their longer side. A part whose file is missing is replaced by a line
saying so; a sample whose image cannot be read gets a placeholder naming the file.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
from pathlib import Path

from PIL import Image

from emor3.data import open_image
from emor3.toy.emoscenes import cue_mentions
from emor3.evaluate import format_table, load_results
from emor3.plot import DPI, make_figure, pyplot, read_metrics, read_records
from emor3.rewards import parse_set

OUTCOMES = {"correct": "correct", "wrong": "wrong", "format": "format failure"}
NOT_REWARDS = ("step", "prompt")  # numeric fields of a sample record that are not reward terms

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table.results { border-collapse: collapse; font-size: 0.85em; }
table.results td, table.results th { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
table.results td:first-child, table.results th:first-child { text-align: left; }
pre.config { background: #f6f6f6; padding: 0.8em; font-size: 0.8em; max-height: 30em; overflow: auto; }
img.curves { max-width: 100%; }
#filters { position: sticky; top: 0; background: #fff; padding: 0.5em 0; z-index: 1; }
#filters label { margin-right: 1em; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 10px; }
.card { border: 1px solid #ccc; border-left: 6px solid #999; border-radius: 4px; padding: 8px; font-size: 0.82em; }
.card[data-outcome=correct] { border-left-color: #2a9d4b; } .card[data-outcome=wrong] { border-left-color: #d1495b; }
.card[data-outcome=format] { border-left-color: #e0a100; }
.card img { float: right; width: 120px; height: auto; margin: 0 0 4px 8px; image-rendering: auto; }
.card .noimg { float: right; width: 120px; font-size: 0.8em; color: #a00; margin-left: 8px; }
.card h3 { font-size: 1em; margin: 0 0 4px 0; }
.card .step { margin: 2px 0; } .card .k { color: #666; }
.card table { border-collapse: collapse; margin-top: 4px; clear: both; }
.card table td { padding: 0 6px 0 0; }
.card .raw { white-space: pre-wrap; word-break: break-word; color: #555; }
.halluc { color: #a00; }
"""

SCRIPT = """
function applyFilter() {
  var choice = document.querySelector('#filters input:checked').value;
  document.querySelectorAll('.card').forEach(function (c) {
    var show = choice === 'all' || c.dataset.outcome === choice ||
               (choice === 'hallucinated' && c.dataset.hallucinated === '1');
    c.hidden = !show;
  });
  document.querySelectorAll('section.step').forEach(function (s) {
    s.hidden = s.querySelectorAll('.card:not([hidden])').length === 0;
  });
  document.body.dataset.filter = choice;
}
document.querySelectorAll('#filters input').forEach(function (b) { b.addEventListener('change', applyFilter); });
if (document.querySelector('#filters')) { applyFilter(); }
"""


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def read_samples(path: Path) -> list[dict]:
    """The records of a samples.jsonl (``plot.read_records``: a truncated last line is skipped with a warning)."""
    return read_records(path, lambda r: isinstance(r.get("completion"), str),
                        "a sample record is a JSON object with a 'completion' text")


def image_data_uri(path: str | Path, thumb: int) -> str:
    """The image at ``path`` (a file, or a parquet dataset's ``<shard>.parquet#<row>``: ``emor3.data.open_image``)
    shrunk to ``thumb`` px on its longer side, as a data URI: PNG when it is that small already (drawn images stay
    exact), JPEG otherwise (photos stay small). OSError / ValueError when unreadable."""
    with open_image(path) as im:
        im = im.convert("RGB")
        small = max(im.size) <= thumb
        if not small:
            im.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG" if small else "JPEG", quality=85)
    return f"data:image/{'png' if small else 'jpeg'};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def curves_data_uri(rows: list[dict]) -> str:
    """The run's curves (``emor3.plot.make_figure``) as a PNG data URI."""
    plt = pyplot()
    fig = make_figure(rows)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def markdown_table_html(table: str) -> str:
    """An HTML table of a markdown table (header row, separator row, body rows; no escaped pipes inside cells)."""
    lines = [line.strip().strip("|").split("|") for line in table.strip().splitlines()]
    head, body = lines[0], lines[2:]
    out = ['<table class="results"><thead><tr>' + "".join(f"<th>{_esc(c.strip())}</th>" for c in head)
           + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{_esc(c.strip())}</td>" for c in row) + "</tr>" for row in body]
    return "\n".join(out) + "</tbody></table>"


def outcome(row: dict) -> str:
    """"format" when the format reward is 0, else "correct" or "wrong" by the accuracy reward."""
    if row.get("format") == 0:
        return "format"
    return "correct" if row.get("accuracy") == 1 else "wrong"


def card_html(row: dict, images: dict, thumb: int) -> tuple[str, str, bool]:
    """(the card's HTML, its outcome, whether its step 1 claims a cue not in the image)."""
    parsed = parse_set(row["completion"])
    kind = outcome(row)
    img = row.get("image")
    if img not in images:
        try:
            images[img] = image_data_uri(img, thumb) if img else None
        except (OSError, ValueError, ImportError):  # ImportError: a parquet row without pyarrow installed
            images[img] = None
    uri = images[img]
    picture = (f'<img src="{uri}" alt="{_esc(row.get("id") or img)}">' if uri else
               f'<div class="noimg">image not readable: {_esc(img or "no image recorded")}</div>')
    hallucinated = False
    cue_line = ""
    if isinstance(row.get("cues"), dict):
        m = cue_mentions(parsed.step1, row["cues"])
        hallucinated = bool(m.wrong)
        truth = ", ".join(f"{k} {v}" for k, v in row["cues"].items())
        claims = ", ".join(f"{k} {v}" for k, v in m.wrong)
        cue_line = (f'<div class="step"><span class="k">cues in the image:</span> {_esc(truth)}; step 1 names '
                    f"{sum(m.named.values())} of {len(m.named)}"
                    + (f'; <span class="halluc">claims {_esc(claims)}</span>' if claims else "") + "</div>")
    answer = parsed.answer
    verdict = {"correct": "✓", "wrong": "✗", "format": "✗ (format)"}[kind]
    lines = [f'<div class="card" data-outcome="{kind}" data-hallucinated="{int(hallucinated)}">', picture,
             f"<h3>{_esc(row.get('id', 'prompt ' + str(row.get('prompt'))))} {verdict}</h3>",
             f'<div class="step"><span class="k">answer</span> <b>{_esc(answer if answer is not None else "(none)")}'
             f'</b> <span class="k">label</span> <b>{_esc(row.get("label", "?"))}</b></div>']
    if any((parsed.step1, parsed.step2, parsed.step3)):
        for k, text in enumerate((parsed.step1, parsed.step2, parsed.step3), 1):
            lines.append(f'<div class="step"><span class="k">step {k}:</span> {_esc(text or "(missing)")}</div>')
    if kind == "format" or not any((parsed.step1, parsed.step2, parsed.step3)):
        lines.append(f'<div class="raw"><span class="k">reply:</span> {_esc(row["completion"])}</div>')
    lines.append(cue_line)
    for judge in ("consistency", "coherence"):
        if f"{judge}_reply" in row:
            reply = row[f"{judge}_reply"]
            lines.append(f'<div class="step"><span class="k">{judge} judge:</span> '
                         + (_esc(repr(reply)) if reply is not None else "no reply (its step is missing, or the judge "
                                                                "scored log-probs)") + "</div>")
    terms = [(k, v) for k, v in row.items() if k not in NOT_REWARDS and isinstance(v, (int, float))
             and not isinstance(v, bool)]
    lines.append("<table><tr>" + "".join(f'<td class="k">{_esc(k)}</td>' for k, _ in terms) + "</tr><tr>"
                 + "".join(f"<td>{v:.3g}</td>" for _, v in terms) + "</tr></table></div>")
    return "\n".join(lines), kind, hallucinated


def build_report(run_dir: str | Path, thumb: int = 160) -> str:
    """The report page of ``run_dir`` as an HTML string (module docstring)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    parts = [f"<h1>emor3 run: {_esc(run.resolve().name)}</h1>", f"<p>{_esc(run.resolve())}</p>"]

    parts.append("<h2>Settings</h2>")
    if (run / "config.toml").is_file():
        parts.append(f'<details><summary>config.toml</summary><pre class="config">'
                     f'{_esc((run / "config.toml").read_text())}</pre></details>')
    else:
        parts.append(f"<p>No config.toml in {_esc(run)}.</p>")

    parts.append("<h2>Results</h2>")
    if (run / "results.json").is_file():
        _, rows = load_results(run)
        parts.append(markdown_table_html(format_table(rows)))
        parts.append("<p>Accuracy in %, with its 95 % Wilson interval from the evaluation set's size.</p>")
    else:
        parts.append(f"<p>No results.json in {_esc(run)} (the run has not finished its evaluation).</p>")

    parts.append("<h2>Training curves</h2>")
    if (run / "metrics.jsonl").is_file():
        try:
            uri = curves_data_uri(read_metrics(run / "metrics.jsonl"))
            parts.append(f'<img class="curves" alt="training curves" src="{uri}">')
        except ImportError as e:
            parts.append(f"<p>{_esc(e)}</p>")
        except ValueError as e:
            parts.append(f"<p>{_esc(run / 'metrics.jsonl')}: {_esc(e)}</p>")
    else:
        parts.append(f"<p>No metrics.jsonl in {_esc(run)}.</p>")

    parts.append("<h2>Samples</h2>")
    samples = read_samples(run / "samples.jsonl") if (run / "samples.jsonl").is_file() else []
    if samples:
        images: dict = {}
        by_step: dict = {}
        counts = dict.fromkeys(["all", *OUTCOMES, "hallucinated"], 0)
        has_cues = any(isinstance(r.get("cues"), dict) for r in samples)
        for r in samples:
            card, kind, halluc = card_html(r, images, thumb)
            by_step.setdefault(r.get("step"), []).append(card)
            counts["all"] += 1
            counts[kind] += 1
            counts["hallucinated"] += halluc
        names = {"all": "all", **OUTCOMES, "hallucinated": "hallucinated cues"}
        choices = [k for k in names if k != "hallucinated" or has_cues]
        parts.append('<div id="filters">' + "".join(
            f'<label><input type="radio" name="filter" value="{k}"{" checked" if k == "all" else ""}> '
            f"{names[k]} ({counts[k]})</label>" for k in choices) + "</div>")
        parts.append("<p>The completions of the first two prompts of the recorded steps (--run.sample-every), "
                     "with every reward term and the RER judge's replies.</p>")
        for step, cards in by_step.items():
            parts.append(f'<section class="step"><h3>step {_esc(step)}</h3><div class="cards">'
                         + "\n".join(cards) + "</div></section>")
    else:
        parts.append(f"<p>No samples in {_esc(run / 'samples.jsonl')} (--run.sample-every 0, or no step ran).</p>")

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>emor3 run {_esc(run.resolve().name)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(parts) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emor3.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="A run folder (config.toml, results.json, metrics.jsonl, samples.jsonl).")
    p.add_argument("--out", type=Path, default=None, help="The HTML file to write (default: RUN_DIR/report.html).")
    p.add_argument("--thumb", type=int, default=160, help="Longer side of the inlined images in pixels (default: 160).")
    a = p.parse_args(argv)
    if a.thumb < 8:
        p.error(f"--thumb {a.thumb}: must be at least 8")
    try:
        page = build_report(a.run_dir, a.thumb)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    out = a.out if a.out is not None else a.run_dir / "report.html"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    print(out)


if __name__ == "__main__":
    main()
