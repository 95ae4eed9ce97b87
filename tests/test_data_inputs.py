"""Inputs are what they claim to be: image shapes Qwen-VL's processor cannot take, 16-bit images, non-UTF-8 bytes.

References: transformers' own qwen2_vl `smart_resize` (the rule the processor applies) and hand-built gradients."""

import json
from pathlib import Path

import numpy as np
import pytest
from hf_reference import internals
from PIL import Image

from emor3.data import BadSampleError, load_dataset, load_manifest, smart_resize
from emor3.data.__main__ import main as cli
from emor3.data.dataset import image_shape_problem, to_rgb


def png(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def manifest(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- image shapes


def test_smart_resize_equals_transformers():
    with internals("smart_resize's module"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference
    sides = [1, 2, 5, 13, 14, 15, 27, 28, 29, 55, 100, 333, 600, 1000, 2800, 5601]
    budgets = [(56 * 56, 28 * 28 * 1280), (112 * 112, 112 * 112), (28 * 28, 56 * 56), (512 * 512, 2048 * 2048)]
    n = 0
    for h in sides:
        for w in sides:
            for lo, hi in budgets:
                try:
                    want = reference(h, w, factor=28, min_pixels=lo, max_pixels=hi)
                except ValueError:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
                    continue
                assert smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi) == want, (h, w, lo, hi)
                n += 1
    assert n > 500, "the grid must exercise many accepted sizes"


def test_image_shape_problem_follows_the_processor_and_the_budget():
    with internals("smart_resize's module"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference
    assert image_shape_problem(600, 2) is not None and "200:1" in image_shape_problem(600, 2)
    with pytest.raises(ValueError):
        reference(2, 600)  # the processor really rejects what we reject for aspect
    assert image_shape_problem(400, 2) is None, "200:1 is still accepted, as by the processor"
    # 40:1 fits Qwen2.5-VL's default budget but not a 112x112 one: the short side would fall under 28 px
    assert image_shape_problem(1120, 28) is None
    msg = image_shape_problem(1120, 28, max_pixels=112 * 112)
    assert msg is not None and "max_pixels=12544" in msg
    h, w = reference(28, 1120, factor=28, min_pixels=112 * 112, max_pixels=112 * 112)
    assert h * w > 112 * 112, "the reference processor indeed exceeds the budget for such an image"
    for size in [(100, 60), (60, 100), (448, 112), (1000, 10), (112, 112)]:  # ordinary shapes pass at 112x112
        if size != (1000, 10):
            assert image_shape_problem(*size, max_pixels=112 * 112) is None, size
    # every accepted shape, resized by the reference, stays within max_pixels
    for w in (28, 60, 300, 1120, 2000):
        for h in (3, 14, 28, 90):
            if image_shape_problem(w, h, min_pixels=28 * 28, max_pixels=112 * 112) is None:
                rh, rw = reference(h, w, factor=28, min_pixels=28 * 28, max_pixels=112 * 112)
                assert rh * rw <= 112 * 112, (w, h)


def test_extreme_aspect_is_caught_at_load_time_with_the_budget(tmp_path):
    png(tmp_path / "ok.png", (60, 40))
    png(tmp_path / "wide.png", (1120, 28))
    m = manifest(tmp_path / "m.jsonl", [{"image": "ok.png", "label": "awe"}, {"image": "wide.png", "label": "fear"}])
    assert len(load_manifest(m)) == 2, "at Qwen2.5-VL's default budget a 40:1 image is fine"
    with pytest.raises(BadSampleError, match=r"m\.jsonl:2: sample 'wide.png': .*wide\.png.*max_pixels=12544") as e:
        load_manifest(m, min_pixels=112 * 112, max_pixels=112 * 112)
    assert e.value.reason == "bad_image_shape"
    ds = load_dataset(m, on_bad_sample="skip", min_pixels=112 * 112, max_pixels=112 * 112)
    assert [s.id for s in ds] == ["ok.png"] and dict(ds.report.skipped) == {"bad_image_shape": 1}
    for verify in ("header", "full"):
        with pytest.raises(BadSampleError, match="bad_image_shape"):
            load_manifest(m, verify=verify, max_pixels=112 * 112)


def test_image_access_names_the_file_when_the_loader_could_not_check(tmp_path):
    png(tmp_path / "thin.png", (600, 2))
    m = manifest(tmp_path / "m.jsonl", [{"image": "thin.png", "label": "awe", "id": "t"}])
    ds = load_manifest(m, verify="exists", max_pixels=112 * 112)  # "exists" never opens the image
    with pytest.raises(BadSampleError, match=r"m\.jsonl: sample 't': .*600x2.*200:1"):
        ds.image(0)


def test_validate_reports_extreme_aspect_and_takes_the_budget(tmp_path, capsys):
    png(tmp_path / "d/awe/ok.png", (60, 40))
    png(tmp_path / "d/awe/thin.png", (600, 2))
    png(tmp_path / "d/fear/wide.png", (1120, 28))
    assert cli(["validate", str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    assert "bad_image_shape=1" in out and "thin.png" in out, out
    assert cli(["validate", str(tmp_path / "d"), "--max-pixels", str(112 * 112)]) == 1
    out = capsys.readouterr().out
    assert "bad_image_shape=2" in out and "wide.png" in out, out


# ---------------------------------------------------------------------------------------------- 16-bit images


def _gradient16(mode_save: str, path: Path) -> np.ndarray:
    values = np.linspace(0, 65535, 257).round().astype(np.uint16)[None, :].repeat(3, 0)  # (3, 257)
    Image.fromarray(values).save(path)
    return values


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gradient_is_scaled_not_clipped(tmp_path, suffix):
    values = _gradient16("I;16", tmp_path / f"g{suffix}")
    with Image.open(tmp_path / f"g{suffix}") as im:
        assert im.mode.startswith("I;16") or im.mode == "I"
    m = manifest(tmp_path / "m.jsonl", [{"image": f"g{suffix}", "label": "awe"}])
    rgb = np.asarray(load_manifest(m).image(0))  # (3, 257, 3)
    want = np.rint(values / 257.0).astype(np.uint8)  # 0..65535 -> 0..255, the 16 -> 8 bit reference
    assert rgb.dtype == np.uint8 and (rgb == want[..., None]).all(), "16-bit grey must be scaled to 8 bits"
    assert (np.diff(rgb[0, :, 0].astype(int)) >= 0).all() and rgb[0, 128, 0] == 128, "the gradient is kept"


def test_to_rgb_modes():
    i32 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32), mode="I")  # 16-bit data in mode I
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 128, 255]
    i8 = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I")  # 8-bit data in mode I
    assert np.asarray(to_rgb(i8))[0, :, 0].tolist() == [0, 100, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    big = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(big))[0, :, 0].tolist() == [0, 128, 255], "other ranges: own min..max stretched"
    rgb = Image.new("RGB", (2, 1), (10, 20, 30))
    assert to_rgb(rgb).tobytes() == rgb.tobytes()
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)


# ---------------------------------------------------------------------------------------------- text encoding


def test_non_utf8_byte_is_that_lines_problem(tmp_path):
    png(tmp_path / "a.png")
    m = tmp_path / "m.jsonl"
    good = json.dumps({"image": "a.png", "label": "awe", "id": "1"}).encode()
    bad = b'{"image": "a.png", "label": "fear", "id": "2", "note": "na\xefve"}'
    m.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + bad + b"\n" + good.replace(b'"1"', b'"3"') + b"\n")
    col = bad.index(0xEF) + 1  # 1-based column of the bad byte in line 2
    with pytest.raises(BadSampleError, match=rf"m\.jsonl:2: not UTF-8 text: byte 0xef at column {col}\b") as e:
        load_manifest(m)
    assert e.value.reason == "malformed_line" and e.value.line == 2
    ds = load_manifest(m, on_bad_sample="skip")
    assert [s.id for s in ds] == ["1", "3"], "the other lines (the first with a BOM) still load"
    assert dict(ds.report.skipped) == {"malformed_line": 1}

    j = tmp_path / "rows.json"  # a whole-file JSON list: the bad byte's line is named
    j.write_bytes(b'[\n{"image": "a.png", "label": "awe"},\n{"image": "a.png", "label": "\xff"}\n]\n')
    with pytest.raises(BadSampleError, match=r"rows\.json:3: not UTF-8"):
        load_dataset(j)
