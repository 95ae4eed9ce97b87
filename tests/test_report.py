"""python -m emor3.report on a tiny trained run: samples.jsonl records what the cards need at the default
--run.sample-every, the page is self-contained (every card has its inlined image, no outside resource), its
numbers equal results.json, the filter's counts match the cards, and, where Chromium is installed, the page loads
headless without a console message."""

import base64
import dataclasses
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from emor3 import report
from emor3.config import RunConfig
from emor3.grpo.train import train
from test_train import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run of 2 GRPO steps (G = 2) at the default --run.sample-every."""
    root = tmp_path_factory.mktemp("report")
    cfg = tiny_config(root, run={"threads": 1})
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, sample_every=RunConfig.sample_every))
    assert cfg.grpo.steps < cfg.run.sample_every, "the run must be shorter than --run.sample-every"
    train(cfg)
    return Path(cfg.run.out)


class Page(HTMLParser):
    """The parts of a report page the tests read: cards (attributes, images), tables, resources, filter labels."""

    def __init__(self, text: str):
        super().__init__()
        self.cards, self.tables, self.filters, self.resources, self.scripts = [], [], {}, [], 0
        self._depth = 0  # nesting depth of divs inside the current card
        self._cell, self._label, self._table = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "card" in (a.get("class") or "").split():
            self.cards.append({"attrs": a, "images": [], "text": ""})
            self._depth = 1
        elif tag == "div" and self._depth:
            self._depth += 1
        if tag == "img":
            (self.cards[-1]["images"] if self._depth else self.resources).append(a.get("src", ""))
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.resources.append(a[key])
        if tag == "script":
            self.scripts += 1
        if tag == "table" and a.get("class") == "results":
            self._table = []
            self.tables.append(self._table)
        if tag == "tr" and self._table is not None:
            self._table.append([])
        if tag in ("td", "th") and self._table is not None:
            self._cell = ""
        if tag == "label":
            self._label = ""
        if tag == "input" and a.get("type") == "radio":
            self._radio = a["value"]

    def handle_endtag(self, tag):
        if tag == "div" and self._depth:
            self._depth -= 1
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(self._cell.strip())
            self._cell = None
        if tag == "table":
            self._table = None
        if tag == "label" and self._label is not None:
            self.filters[self._radio] = self._label.strip()
            self._label = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._label is not None:
            self._label += data
        if self._depth:
            self.cards[-1]["text"] += data


def _decode(uri: str) -> Image.Image:
    head, data = uri.split(",", 1)
    assert re.fullmatch(r"data:image/(png|jpeg);base64", head), head
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_samples_record_what_the_cards_need(run):
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert rows and {r["step"] for r in rows} == {2}, "the last step is recorded even when it is no multiple of N"
    for r in rows:
        assert Path(r["image"]).is_absolute() and Path(r["image"]).is_file(), r["image"]
        assert {"id", "label", "taxonomy", "cues", "consistency_reply", "coherence_reply", "completion",
                "accuracy", "format", "consistency", "coherence", "total"} <= set(r)


def test_page_is_self_contained_and_its_numbers_equal_results_json(run, tmp_path):
    out = tmp_path / "r.html"
    report.main([str(run), "--out", str(out)])
    page = Page(out.read_text())
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(page.cards) == len(rows), "one card per sample record"
    for card, row in zip(page.cards, rows):
        assert len(card["images"]) == 1, f"card {row['id']} must have exactly one image"
        with Image.open(row["image"]) as im:
            assert _decode(card["images"][0]).size == im.size, "a small image is inlined at its own size"
        assert card["attrs"]["data-outcome"] in ("correct", "wrong", "format")
        assert row["label"] in card["text"] and row["id"] in card["text"]
    assert all(u.startswith("data:image/") for u in page.resources), f"outside resources: {page.resources}"
    assert any(u.startswith("data:image/png") for u in page.resources), "the curves are inlined"
    assert "http://" not in out.read_text() and "https://" not in out.read_text()

    results = json.loads((run / "results.json").read_text())
    (table,) = page.tables
    head, body = table[0], {r[0]: r[1:] for r in table[1:]}
    assert set(body) == set(results)
    for model, res in results.items():
        for name, v in res["sets"].items():
            col = head.index(name + ("^I" if v["domain"] == "in" else "")) - 1
            lo, hi = v["accuracy_ci"]
            assert body[model][col] == f"{v['accuracy']:.2f} [{lo:.1f}, {hi:.1f}]", (model, name)
        col = head.index("run A") - 1
        assert body[model][col] == f"{res['run A']:.2f} [{res['run A_ci'][0]:.1f}, {res['run A_ci'][1]:.1f}]"
    assert (run / "config.toml").read_text().split("\n")[0] in out.read_text(), "the settings are shown"


def _card_row(image: Path, completion: str, accuracy: float, fmt: float, **kw) -> dict:
    return {"step": 10, "prompt": 0, "id": kw.pop("id", "s"), "image": str(image), "label": "fear",
            "taxonomy": "mikels8", "cues": {"face": "frown", "sky": "stormy", "object": "spider"},
            "consistency_reply": "yes", "coherence_reply": "fear", "completion": completion,
            "accuracy": accuracy, "format": fmt, "consistency": 1.0, "coherence": 1.0, "total": 1.0, **kw}


def test_filters_count_correct_wrong_format_and_hallucinated(run, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("config.toml", "results.json"):  # no metrics.jsonl: the curves are not what this test reads
        shutil.copy(run / name, folder / name)
    image = Path(json.loads((run / "samples.jsonl").read_text().splitlines()[0])["image"])
    set_reply = "<step1>{}</step1><step2>Scary.</step2><step3>Negative, high arousal.</step3>\\boxed{{{}}}"
    rows = [_card_row(image, set_reply.format("A frowning face, a spider, a stormy sky.", "fear"), 1, 1, id="ok"),
            _card_row(image, set_reply.format("A frowning face and a gift.", "sadness"), 0, 1, id="halluc"),
            _card_row(image, "just fear", 0, 0, id="fmt", consistency_reply=None, coherence_reply=None),
            _card_row(tmp_path / "gone.png", set_reply.format("A spider.", "fear"), 1, 1, id="noimage")]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "comp')
    with pytest.warns(UserWarning, match="samples.jsonl:5"):
        page = Page(report.build_report(folder))
    outcomes = [c["attrs"]["data-outcome"] for c in page.cards]
    assert outcomes == ["correct", "wrong", "format", "correct"], "a truncated last line is skipped"
    assert [c["attrs"]["data-hallucinated"] for c in page.cards] == ["0", "1", "0", "0"], "gift is not in the image"
    assert page.filters == {"all": "all (4)", "correct": "correct (2)", "wrong": "wrong (1)",
                            "format": "format failure (1)", "hallucinated": "hallucinated cues (1)"}
    assert "claims object gift" in page.cards[1]["text"]
    assert "no reply (its step is missing" in page.cards[2]["text"] and "just fear" in page.cards[2]["text"]
    assert page.cards[3]["images"] == [] and "image not readable" in page.cards[3]["text"]
    assert "'yes'" in page.cards[0]["text"] and "'fear'" in page.cards[0]["text"], "the judge's replies are shown"


def test_missing_parts_and_bad_input(tmp_path, capsys):
    (tmp_path / "config.toml").write_text("[run]\nseed = 0\n")
    text = report.build_report(tmp_path)
    assert "No results.json" in text and "No metrics.jsonl" in text and "No samples" in text
    (tmp_path / "samples.jsonl").write_text('{"completion": "a"}\nnot json\n{"completion": "b"}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:2: not JSON"):
        report.build_report(tmp_path)
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "nosuch")])
    assert e.value.code == 2 and "nosuch: no such run folder" in capsys.readouterr().err


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _headless(url: str) -> tuple[str, list[str]]:
    """(the DOM after the page's script ran, the console messages Chromium logged)."""
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return res.stdout, [line for line in res.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_page_loads_headless_without_console_messages(run, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>nosuchfunction();</script></body></html>")
    assert _headless(bad.as_uri())[1], "the check must see a script error (Chromium's console logging changed?)"
    out = tmp_path / "report.html"
    report.main([str(run), "--out", str(out)])
    dom, console = _headless(out.as_uri())
    assert not console, console
    assert 'data-filter="all"' in dom, "the filter script ran to its end"
