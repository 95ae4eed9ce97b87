"""The release's dataset format: a Hugging Face dataset folder of parquet shards in EasyR1's columns (`problem`,
`answer`, `images` as {bytes, path} structs, the coarse answer column), written here in the hub's layout
(data/train-00000-of-00001.parquet, data/test-00000-of-00001.parquet). It loads, validates, trains and evaluates;
bad rows are named by shard and row; without pyarrow the error names the extra."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emor3.data import BadSampleError, BytesImage, load_dataset, parquet_splits
from emor3.data.__main__ import main as data_main

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
LABELS = ["awe", "fear", "sadness", "amusement"]


def _png(colour, size=(56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _write_dataset(root: Path, n_train: int = 8, n_test: int = 4, bad_test_row: int | None = None) -> Path:
    """The hub's layout: data/<split>-00000-of-00001.parquet, one image per row as a {bytes, path} struct."""
    pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is not installed")
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = [[{"bytes": _png(COLOURS[i % 4]), "path": f"{split}_{i}.png"}] for i in range(n)]
        if split == "test" and bad_test_row is not None:
            images[bad_test_row] = [{"bytes": b"not a png", "path": "broken.png"}]
        table = pa.table({
            "problem": ["<image>Which emotion does this image evoke?"] * n,
            "answer": [LABELS[i % 4] if i % 3 else "\\boxed{" + LABELS[i % 4] + "}" for i in range(n)],
            "course_grained": ["negative" if LABELS[i % 4] in ("fear", "sadness") else "positive" for i in range(n)],
            "images": images,
        })
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_hub_layout_loads_easyr1_columns(tmp_path):
    root = _write_dataset(tmp_path / "EmoSet2k")
    assert sorted(parquet_splits(root)) == ["test", "train"]
    train = load_dataset(f"{root}@train")
    assert load_dataset(root, split="train").samples == train.samples, "PATH@SPLIT and split= are the same split"
    assert [s.label for s in train] == [LABELS[i % 4] for i in range(8)], "answer (boxed or not) is the label"
    assert train.taxonomy.name == "mikels8" and train.report.layout == "parquet"
    first = train[0]
    assert first.id == "train-00000-of-00001.parquet#0"
    assert first.question == "Which emotion does this image evoke?", "problem minus its <image> marker"
    assert first.metadata["coarse_answer"] == "positive" and first.metadata["image_name"] == "train_0.png"
    assert isinstance(first.image, BytesImage)
    # the pixels are the PNG's: row 1 is green, resized within the default budget only if needed
    px = np.asarray(train.image(1))
    assert px.shape[:2] == (56, 56) and tuple(px[0, 0]) == COLOURS[1]
    assert len(load_dataset(root, split="test")) == 4


def test_a_split_must_be_named_when_there_are_several(tmp_path):
    root = _write_dataset(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]: pass split=.*@train"):
        load_dataset(root)


def test_bad_rows_name_the_shard_and_row(tmp_path):
    root = _write_dataset(tmp_path / "ds", bad_test_row=2)
    shard = root / "data" / "test-00000-of-00001.parquet"
    with pytest.raises(BadSampleError, match=rf"{shard}, row 2: .*cannot be decoded.*\[unreadable_image\]"):
        load_dataset(root, split="test")
    kept = load_dataset(root, split="test", on_bad_sample="skip")
    assert len(kept) == 3 and kept.report.skipped == {"unreadable_image": 1}


def test_a_shard_without_the_columns_is_named(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is not installed")
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    shard = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": ["hello"], "answer": ["awe"]}), shard)
    with pytest.raises(BadSampleError, match=rf"{shard}: no images or image column"):
        load_dataset(tmp_path)


def test_bad_labels_and_image_lists_name_the_shard_and_row(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is not installed")
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    shard = tmp_path / "data" / "train-00000-of-00001.parquet"
    png = {"bytes": _png(COLOURS[0]), "path": None}
    pq.write_table(pa.table({"problem": ["Which?"] * 3, "answer": ["awe", "banana", "fear"],
                             "images": [[png], [png], [png, png]]}), shard)
    ds = load_dataset(tmp_path, "mikels8", "skip")
    assert len(ds) == 1 and ds.report.skipped == {"unknown_label": 1, "malformed_line": 1}
    (label,), (images,) = ds.report.examples["unknown_label"], ds.report.examples["malformed_line"]
    assert label.startswith(f"{shard}, row 1: ") and "'banana' is not in taxonomy 'mikels8'" in label
    assert images.startswith(f"{shard}, row 2: ") and "exactly one image" in images


def test_image_paths_are_read_relative_to_the_dataset(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is not installed")
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    Image.new("RGB", (56, 56), COLOURS[2]).save(tmp_path / "a.png")
    pq.write_table(pa.table({"problem": ["Which?"], "answer": ["awe"], "images": [["a.png"]]}),
                   tmp_path / "data" / "train-00000-of-00001.parquet")
    ds = load_dataset(tmp_path)
    assert ds[0].image == tmp_path / "a.png" and tuple(np.asarray(ds.image(0))[0, 0]) == COLOURS[2]


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet now fails
    one_line = r"^reading a parquet dataset needs pyarrow: pip install 'emor3\[parquet\]'$"
    with pytest.raises(ModuleNotFoundError, match=one_line):
        load_dataset(tmp_path)


def test_validate_checks_every_split(tmp_path, capsys):
    root = _write_dataset(tmp_path / "ds", bad_test_row=1)
    assert data_main(["validate", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{root} [test]: 3 samples, layout parquet" in out and f"{root} [train]: 8 samples, layout parquet" in out
    assert "test-00000-of-00001.parquet, row 1" in out
    assert data_main(["validate", f"{root}@train"]) == 0
    assert data_main(["emoset-subset", str(root), str(tmp_path / "subset")]) == 2, "EmoSet2k already is the subset"


def test_a_parquet_dataset_trains_and_evaluates(tmp_path):
    from emor3.config import config_from_dict
    from emor3.grpo.train import train

    root = _write_dataset(tmp_path / "ds")
    cfg = config_from_dict({
        "data": {"train": f"{root}@train", "eval": [f"emoset2k={root}@test@in"], "taxonomy": "mikels8"},
        "sft": {"steps": 0, "instruct_steps": 0},
        "grpo": {"steps": 1, "prompts_per_step": 2, "mini_batch_prompts": 2, "group_size": 2, "micro_batch_rows": 2,
                 "max_new_tokens": 8},
        "reward": {"judge_max_new_tokens": 2},
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "run": {"out": str(tmp_path / "run"), "progress": False, "sample_every": 1},
    })
    train(cfg)
    out = Path(cfg.run.out)
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step["step"] == 1 and np.isfinite(step["loss"])
    # samples.jsonl names each image by shard and row, and the report page inlines it from there
    from emor3.data import open_image
    from emor3.report import build_report

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    shard = (root / "data" / "train-00000-of-00001.parquet").resolve()
    assert samples and all(r["image"].startswith(f"{shard}#") for r in samples)
    row = int(samples[0]["image"].rsplit("#", 1)[1])
    assert tuple(np.asarray(open_image(samples[0]["image"]).convert("RGB"))[0, 0]) == COLOURS[row % 4]
    page = build_report(out)
    assert page.count('<img src="data:image/png;base64,') >= len(samples) and "image not readable" not in page
    results = json.loads((out / "results.json").read_text())
    assert "emoset2k" in json.dumps(results), "the parquet test split is in the evaluation table"
    # the evaluation entry point on the trained checkpoint reads the same split
    from emor3 import evaluate
    from emor3.checkpoints import latest_checkpoint

    evaluate.main(["--model", str(latest_checkpoint(out) / "model"), "--data", f"{root}@train",
                   "--eval-data", f"emoset2k={root}@test@in", "--eval.max-new-tokens", "4",
                   "--run.progress", "false", "--out", str(tmp_path / "eval")])
    (row,) = json.loads((tmp_path / "eval" / "results.json").read_text()).values()
    assert row["sets"]["emoset2k"]["n"] == 4 and row["sets"]["emoset2k"]["domain"] == "in", "all 4 test rows, in domain"


def test_trace_manifests_write_parquet_images_to_files(tmp_path):
    from emor3.traces import trace_rows

    root = _write_dataset(tmp_path / "ds")
    train = load_dataset(root, split="train")
    rows = trace_rows(train, {1: "<step1>a</step1>"}, image_dir=tmp_path / "images")
    assert rows[1]["response"] == "<step1>a</step1>" and rows[1]["coarse_answer"] == "negative"
    files = [Path(r["image"]) for r in rows]
    assert files[0].parent == (tmp_path / "images").resolve() and files[0].suffix == ".png"
    assert files[0] == files[4], "rows 0 and 4 hold the same PNG bytes: one file"
    assert tuple(np.asarray(Image.open(files[1]).convert("RGB"))[0, 0]) == COLOURS[1]
    again = load_dataset(_manifest(tmp_path, rows))
    assert [s.label for s in again] == [s.label for s in train] and again[1].metadata["response"] == "<step1>a</step1>"
    with pytest.raises(ValueError, match="not a file"):
        trace_rows(train, {})


def _manifest(tmp_path: Path, rows: list) -> Path:
    from emor3.data import write_manifest

    return write_manifest(tmp_path / "traces.jsonl", rows)
