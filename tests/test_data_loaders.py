"""Loaders on fixture trees written here: JSONL manifests (ours and EasyR1 rows), image folders, EmoSet; every kind
of bad input in error and skip mode; lazy, budgeted, cached image access; the validate command."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from emor3.data import BadSampleError, Sample, load_dataset, load_emoset, load_image_folder, load_manifest
from emor3.data.__main__ import main as cli


def png(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- good layouts


def test_manifest_relative_paths_ids_metadata(tmp_path, monkeypatch):
    png(tmp_path / "data/img/a.png")
    png(tmp_path / "data/img/b.png")
    m = jsonl(tmp_path / "data/train.jsonl", [
        {"image": "img/a.png", "label": "Awe", "id": "s1", "cues": {"sky": "night"}},
        {"image": "img/b.png", "label": "scared"},  # synonym, no id
    ])
    monkeypatch.chdir(tmp_path)  # paths must resolve against the manifest's folder, not the working directory
    ds = load_dataset(Path("data") / "train.jsonl")
    assert [s.id for s in ds] == ["s1", "img/b.png"], "ids: given id, else the relative image path (stable)"
    assert [s.label for s in ds] == ["awe", "fear"] and ds.taxonomy.name == "mikels8"
    assert ds[0].metadata == {"cues": {"sky": "night"}}, "extra keys must be kept as metadata"
    assert ds[1].image == (Path("data") / "img/b.png") and ds.image(1).size == (40, 30)
    assert ds.report.ok and ds.report.loaded == 2
    assert load_dataset(m.parent).samples[0].id == "s1", "a folder with one manifest loads it"


def test_easyr1_rows(tmp_path):
    png(tmp_path / "x.jpg")
    m = jsonl(tmp_path / "r1.jsonl", [
        {"images": ["x.jpg"], "problem": "<image>Which emotion?", "answer": r"\boxed{joy}"},
        {"images": [{"path": "x.jpg"}], "problem": "p", "answer": "sadness", "id": "second"},
        {"images": "x.jpg", "problem": "p", "answer": "disgust", "id": "third"},
    ])
    ds = load_manifest(m)
    assert [s.label for s in ds] == ["joy", "sadness", "disgust"] and ds.taxonomy.name == "emotion6"
    assert ds[0].question == "Which emotion?", "EasyR1's problem is the sample's question, <image> marker removed"
    assert "problem" not in ds[0].metadata, "the question is kept once, on the Sample, not also in metadata"
    jsonl(m, [{"images": ["x.jpg", "x.jpg"], "problem": "p", "answer": "joy"}])
    with pytest.raises(BadSampleError, match=r"r1\.jsonl:1: .*exactly one image"):
        load_manifest(m)


def test_per_row_taxonomy_and_ambiguity(tmp_path):
    png(tmp_path / "a.png")
    m = jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "label": "positive", "taxonomy": "binary", "id": "1"},
                                     {"image": "a.png", "label": "joy", "taxonomy": "emotion6", "id": "2"}])
    ds = load_manifest(m)
    assert [s.taxonomy for s in ds] == ["binary", "emotion6"] and ds.taxonomy is None
    jsonl(m, [{"image": "a.png", "label": "anger"}])
    with pytest.raises(ValueError, match="taxonomy="):  # anger fits Mikels, Emotion6, WebEmo equally
        load_manifest(m)
    assert load_manifest(m, "emotion6")[0].taxonomy == "emotion6"


def test_image_folder(tmp_path):
    root = tmp_path / "emo6"
    png(root / "joy/1.png")
    png(root / "Sadness/2.jpg")
    png(root / "fear/sub/3.png")
    png(root / "disgust/4.png")
    (root / "README.txt").write_text("not a sample")
    (root / "joy/.DS_Store").write_text("junk")
    ds = load_dataset(root)
    assert ds.report.layout == "image-folder" and ds.taxonomy.name == "emotion6"
    assert sorted((s.id, s.label) for s in ds) == [("Sadness/2.jpg", "sadness"), ("disgust/4.png", "disgust"),
                                                  ("fear/sub/3.png", "fear"), ("joy/1.png", "joy")]


def _emoset(root: Path, rows_by_split, three=False):
    for split, rows in rows_by_split.items():
        out = []
        for label, name in rows:
            png(root / f"image/{label}/{name}.jpg")
            (root / f"annotation/{label}").mkdir(parents=True, exist_ok=True)
            (root / f"annotation/{label}/{name}.json").write_text(json.dumps({"image_id": name, "scene": "park"}))
            row = [label, name, f"image/{label}/{name}.jpg", f"annotation/{label}/{name}.json"]
            out.append([row[0], row[2], row[3]] if three else row)
        (root / f"{split}.json").write_text(json.dumps(out))


@pytest.mark.parametrize("three", [False, True])
def test_emoset_layout(tmp_path, three):
    _emoset(tmp_path, {"train": [("awe", "awe_00001"), ("anger", "anger_00002")], "test": [("fear", "fear_9")]},
            three=three)
    ds = load_dataset(tmp_path, split="train")
    assert ds.report.layout == "emoset" and ds.taxonomy.name == "mikels8"
    assert [(s.id, s.label) for s in ds] == [("awe_00001", "awe"), ("anger_00002", "anger")]
    assert ds[0].metadata["annotation"] == {"image_id": "awe_00001", "scene": "park"}
    assert len(load_dataset(tmp_path / "test.json")) == 1, "a split file alone is detected as EmoSet"
    with pytest.raises(ValueError, match="split="):
        load_emoset(tmp_path)


# ---------------------------------------------------------------------------------------------- bad input


def _bad_manifest(tmp_path, kind):
    """A manifest with two good rows and one bad row (line 2) of the given kind."""
    png(tmp_path / "good1.png")
    png(tmp_path / "good2.png")
    bad = {"image": "bad.png", "label": "awe", "id": "bad"}
    if kind == "missing_file":
        pass
    elif kind == "unreadable_image":
        (tmp_path / "bad.png").write_bytes(b"this is not an image at all")
    elif kind == "truncated":
        png(tmp_path / "full.png", size=(64, 64), color=(1, 2, 3))
        Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "full.png")
        data = (tmp_path / "full.png").read_bytes()
        (tmp_path / "bad.png").write_bytes(data[: len(data) // 2])
    elif kind == "zero_size_image":
        (tmp_path / "bad.png").write_bytes(b"")
    elif kind == "unknown_label":
        png(tmp_path / "bad.png")
        bad["label"] = "hunger"
    elif kind == "malformed_line":
        bad = '{"image": "bad.png", "label": '
    elif kind == "duplicate_id":
        png(tmp_path / "bad.png")
        bad["id"] = "g1"
    elif kind == "extreme_aspect":  # Qwen's processor rejects aspect ratios over 200:1
        png(tmp_path / "bad.png", size=(600, 2))
    rows = [{"image": "good1.png", "label": "awe", "id": "g1"}, bad, {"image": "good2.png", "label": "fear"}]
    m = jsonl(tmp_path / "m.jsonl", rows)
    if kind == "not_utf8":  # one Latin-1 byte in line 2 only
        lines = m.read_bytes().split(b"\n")
        lines[1] = b'{"image": "bad.png", "label": "awe", "note": "caf\xe9"}'
        m.write_bytes(b"\n".join(lines))
    return m


KINDS = {"missing_file": "missing_file", "unreadable_image": "unreadable_image", "truncated": "unreadable_image",
         "zero_size_image": "zero_size_image", "unknown_label": "unknown_label", "malformed_line": "malformed_line",
         "duplicate_id": "duplicate_id", "extreme_aspect": "bad_image_shape", "not_utf8": "malformed_line"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input_error_names_file_line_and_problem(tmp_path, kind):
    m = _bad_manifest(tmp_path, kind)
    with pytest.raises(BadSampleError) as e:
        load_dataset(m, "mikels8")
    msg = str(e.value)
    assert e.value.reason == KINDS[kind], msg
    assert "m.jsonl:2" in msg, f"error must name the manifest and line: {msg}"
    if kind not in ("malformed_line", "not_utf8"):
        assert repr("bad" if kind != "duplicate_id" else "g1") in msg, f"error must name the sample id: {msg}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input_skip_counts_by_reason(tmp_path, kind):
    m = _bad_manifest(tmp_path, kind)
    ds = load_dataset(m, "mikels8", on_bad_sample="skip")
    assert len(ds) == 2, "exactly the bad row is skipped"
    assert dict(ds.report.skipped) == {KINDS[kind]: 1}, "skips must be counted by reason, never dropped silently"
    assert KINDS[kind] in ds.report.summary() and "m.jsonl:2" in ds.report.summary()


def test_empty_dataset_is_an_error_in_both_modes(tmp_path):
    m = jsonl(tmp_path / "m.jsonl", ["", "  "])
    for mode in ("error", "skip"):
        with pytest.raises(BadSampleError, match="no usable samples") as e:
            load_manifest(m, "mikels8", mode)
        assert e.value.reason == "empty_dataset"
    jsonl(m, [{"image": "nope.png", "label": "awe"}])
    with pytest.raises(BadSampleError, match="missing_file"):  # all skipped: says what was skipped
        load_manifest(m, "mikels8", "skip")


def test_image_folder_and_emoset_bad_input(tmp_path):
    root = tmp_path / "folder"
    png(root / "awe/1.png")
    png(root / "hunger/2.png")
    (root / "awe/notes.txt").write_text("x")
    with pytest.raises(BadSampleError, match=r"awe/notes\.txt.*not an image file"):
        load_image_folder(root, "mikels8")
    ds = load_image_folder(root, "mikels8", "skip")
    assert len(ds) == 1 and dict(ds.report.skipped) == {"unknown_label": 1, "unreadable_image": 1}

    es = tmp_path / "emoset"
    _emoset(es, {"train": [("awe", "a1"), ("fear", "f1")]})
    (es / "annotation/fear/f1.json").unlink()
    with pytest.raises(BadSampleError, match=r"train\.json: sample 'f1': annotation file .* does not exist"):
        load_emoset(es, "train")
    doc = json.loads((es / "train.json").read_text()) + [["awe", "only-two"]]
    (es / "train.json").write_text(json.dumps(doc))
    ds = load_emoset(es, "train", "skip")
    assert dict(ds.report.skipped) == {"missing_file": 1, "malformed_line": 1} and len(ds) == 1


# ---------------------------------------------------------------------------------------------- images


def test_images_are_lazy_budgeted_and_decoded_once(tmp_path, monkeypatch):
    png(tmp_path / "a.png", size=(100, 60))
    m = jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "label": "awe"}])
    calls = []
    real = Sample.open_image
    monkeypatch.setattr(Sample, "open_image", lambda self: calls.append(self.id) or real(self))
    ds = load_manifest(m, verify="header", min_pixels=28 * 28, max_pixels=56 * 56)
    assert calls == [], "building a dataset must not decode images"
    for _epoch in range(3):
        img = ds.image(0)
    assert calls == ["a.png"], "an image must be decoded and resized once, not once per epoch"
    assert img.size == (56, 28), "smart_resize: sides multiples of 28, area within max_pixels, aspect kept"

    cache = tmp_path / "cache"
    ds1 = load_manifest(m, verify="header", max_pixels=56 * 56, cache_dir=cache)
    ds1.image(0)
    calls.clear()
    ds2 = load_manifest(m, verify="header", max_pixels=56 * 56, cache_dir=cache)
    assert ds2.image(0).tobytes() == ds1.image(0).tobytes() and calls == [], "disk cache must be reused"


# ---------------------------------------------------------------------------------------------- CLI


def test_validate_cli(tmp_path, capsys):
    root = tmp_path / "folder"
    png(root / "awe/1.png")
    png(root / "fear/2.png")
    png(root / "fear/3.png")
    assert cli(["validate", str(root)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+fear\s+2$", out, re.M) and re.search(r"^\s+awe\s+1$", out, re.M), out
    assert "OK" in out
    (root / "fear/4.png").write_bytes(b"")
    (root / "fear/5.png").write_bytes(b"garbage")
    assert cli(["validate", str(root)]) == 1, "problems must give a non-zero exit"
    out = capsys.readouterr().out
    assert "zero_size_image=1" in out and "unreadable_image=1" in out and "5.png" in out
    assert cli(["validate", str(root), "--on-bad-sample", "error"]) == 1
    assert cli(["validate", str(tmp_path / "nothing")]) == 2

    _emoset(tmp_path / "es", {"train": [("awe", "a")], "test": [("fear", "f")]})
    assert cli(["validate", str(tmp_path / "es")]) == 0
    out = capsys.readouterr().out
    assert "[train]" in out and "[test]" in out, "validate checks every EmoSet split"
