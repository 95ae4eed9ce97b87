"""python -m emor3.plot: panels drawn from the right metric keys, PNG size, a truncated last line, missing matplotlib."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from emor3 import plot

# the keys one GRPO step of the train loop records (a subset of a real metrics.jsonl from examples/quick.toml)
KEYS = ("reward/total", "reward/accuracy", "reward/format", "reward/consistency", "reward/coherence", "accuracy",
        "format_rate", "kl", "entropy", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "completion_len_mean",
        "completion_len_max", "grad_norm", "time/rollout", "time/judge", "time/reference", "time/update",
        "time/step", "lr", "loss")


def record(step: int) -> dict:
    # every key gets its own value pattern so a panel reading the wrong key is caught
    r = {"step": step}
    for i, k in enumerate(KEYS):
        r[k] = round(0.01 * (i + 1) * step + 0.001 * i, 6)
    r["time/step"] = sum(r[k] for k in ("time/rollout", "time/judge", "time/reference", "time/update"))
    return r


def write_run(tmp_path: Path, rows: list[dict], tail: str = "") -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run


def test_panels_draw_their_keys_values():
    rows = [record(s) for s in range(1, 6)]
    fig = plot.make_figure(rows)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [p.title for p in plot.PANELS]
    for ax, panel in zip(visible, plot.PANELS):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert set(lines) == set(panel.keys), f"{panel.title}: lines {sorted(lines)} != keys {panel.keys}"
        for key, ln in lines.items():
            assert list(ln.get_xdata()) == [1, 2, 3, 4, 5], key
            assert list(ln.get_ydata()) == [r[key] for r in rows], f"{panel.title}: line {key} shows another key"
        if panel.stacked:  # stackplot: one filled polygon per phase; its top edge is the running sum of the phases
            assert len(ax.collections) == len(panel.stacked)
            top = ax.collections[-1].get_paths()[0].vertices[:, 1].max()
            assert top == pytest.approx(max(r["time/step"] for r in rows))


def test_missing_keys_drop_panels_and_lines():
    rows = [{k: v for k, v in record(s).items() if k not in ("kl", "clip_frac_dual")} for s in range(1, 4)]
    fig = plot.make_figure(rows)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "KL to the reference" not in titles, "a beta = 0 run has no KL: its panel must be left out, not empty"
    clip = next(ax for ax in fig.axes if ax.get_title() == "clip fractions")
    assert {ln.get_label() for ln in clip.get_lines()} == {"clip_frac_low", "clip_frac_high"}
    with pytest.raises(ValueError, match="none of the keys"):
        plot.make_figure([{"step": 1, "unrelated": 1.0}])


def test_png_written_with_expected_size(tmp_path):
    run = write_run(tmp_path, [record(s) for s in range(1, 8)])
    out = plot.plot_run(run)
    assert out == run / "curves.png"
    w, h = plot.PANEL_INCHES
    rows = -(-len(plot.PANELS) // plot.COLUMNS)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (plot.COLUMNS * w * plot.DPI, rows * h * plot.DPI)
        assert len(im.convert("L").getcolors()) > 10, "the figure is blank"


def test_truncated_last_line_skipped_with_warning(tmp_path):
    rows = [record(s) for s in range(1, 4)]
    run = write_run(tmp_path, rows, tail='{"step": 4, "reward/tot')  # a crash mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: skipping the last line"):
        got = plot.read_metrics(run / "metrics.jsonl")
    assert got == rows
    with pytest.warns(UserWarning):
        assert plot.plot_run(run).is_file()


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    run = write_run(tmp_path, [record(1)], tail='{"step": 2,\n' + json.dumps(record(3)) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        plot.read_metrics(run / "metrics.jsonl")


def test_smoothing_and_metrics_flag(tmp_path):
    rows = [record(s) for s in range(1, 6)]
    assert plot.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    fig = plot.make_figure(rows, (plot.Panel("kl", ("kl",)),), smooth_k=3)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    raw, smoothed = ax.get_lines()
    assert list(smoothed.get_ydata()) == pytest.approx(plot.smooth([r["kl"] for r in rows], 3))
    run = write_run(tmp_path, rows)
    out = tmp_path / "two.png"
    subprocess.run([sys.executable, "-m", "emor3.plot", str(run), "--metrics", "kl,entropy", "--out", str(out)],
                   check=True, capture_output=True)
    with Image.open(out) as im:
        assert im.size == (2 * plot.PANEL_INCHES[0] * plot.DPI, plot.PANEL_INCHES[1] * plot.DPI)


def test_missing_matplotlib_names_the_extra(tmp_path):
    run = write_run(tmp_path, [record(1)])
    # a None entry in sys.modules makes `import matplotlib` raise ImportError, as when it is not installed
    code = ("import sys; sys.modules['matplotlib'] = None; from emor3.plot import main; "
            f"main([{str(run)!r}])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 1
    assert "needs matplotlib" in res.stderr and "emor3[plot]" in res.stderr, res.stderr
    assert not (run / "curves.png").exists()


def test_an_unknown_metrics_key_is_refused_with_the_keys_there(tmp_path, capsys):
    run = write_run(tmp_path, [record(s) for s in range(1, 4)])
    with pytest.raises(SystemExit) as e:
        plot.main([str(run), "--metrics", "kl,klx"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--metrics klx: no record has this key" in err and "entropy" in err, "the error lists the keys there"
    assert not (run / "curves.png").exists(), "nothing is drawn when a named key is unknown"
