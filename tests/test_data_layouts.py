"""Loaders for the published layouts, each on a small synthetic tree in that layout: Emotion6 (images/<keyword>/
plus ground_truth.txt probabilities), WebEmo (URL lists, category.txt, a folder of downloaded images), and the
paper's EmoSet subset drawn from full EmoSet split files."""

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from emor3.data import BadSampleError, build_emoset_subset, load_dataset, load_emotion6, load_webemo
from emor3.data.__main__ import main as cli
from emor3.data.loaders import _stratified_counts


def img(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)
    return path


# ---------------------------------------------------------------------------------------------- Emotion6

E6_HEADER = ("[image_filename]\t[valence]\t[arousal]\t[prob. anger]\t[prob. disgust]\t[prob. fear]\t[prob. joy]\t"
             "[prob. sadness]\t[prob. surprise]\t[prob. neutral]")
#        file            valence arousal anger disgust fear  joy   sadness surprise neutral   -> argmax label
E6_ROWS = [
    ("disgust/1.jpg", 2.5, 3.8, 0.133333, 0.7, 0, 0.0666667, 0.1, 0, 0),  # the README's example -> disgust
    ("joy/1.jpg", 6.1, 5.0, 0, 0, 0, 0.2, 0, 0.6, 0.2),  # votes disagree with the keyword -> surprise
    ("fear/1.jpg", 3.0, 6.0, 0.2, 0, 0.4, 0, 0.4, 0, 0),  # fear/sadness tie, keyword among them -> fear
    ("anger/2.jpg", 5.0, 5.0, 0.2, 0, 0, 0.4, 0, 0.4, 0),  # joy/surprise tie, keyword not -> joy (column order)
    ("sadness/1.jpg", 4.0, 2.0, 0, 0, 0, 0, 0, 0, 1.0),  # every vote neutral -> the keyword, sadness
]


def emotion6_tree(root: Path, rows=E6_ROWS, extra_lines=()) -> Path:
    for r in rows:
        img(root / "images" / r[0])
    lines = [E6_HEADER] + ["\t".join(str(x) for x in r) for r in rows] + list(extra_lines)
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n")
    return root


def test_emotion6_argmax_labels_ties_and_metadata(tmp_path):
    root = emotion6_tree(tmp_path / "Emotion6")
    ds = load_dataset(root)
    assert ds.report.layout == "emotion6" and ds.taxonomy.name == "emotion6"
    assert [(s.id, s.label) for s in ds] == [("disgust/1.jpg", "disgust"), ("joy/1.jpg", "surprise"),
                                             ("fear/1.jpg", "fear"), ("anger/2.jpg", "joy"),
                                             ("sadness/1.jpg", "sadness")], "argmax over the six, ties as stated"
    assert dict(ds.report.notes) == {"argmax_tie": 2, "label_from_folder": 1}
    m = ds[0].metadata
    assert m["valence"] == 2.5 and m["arousal"] == 3.8 and m["keyword"] == "disgust"
    assert m["distribution"]["disgust"] == 0.7 and set(m["distribution"]) == {
        "anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"}
    assert ds[1].image == root / "images/joy/1.jpg" and ds.image(1).size == (40, 30)
    folder = load_emotion6(root / "ground_truth.txt", label="folder")
    assert [s.label for s in folder] == ["disgust", "joy", "fear", "anger", "sadness"], "label='folder': keyword"


def test_emotion6_bad_lines(tmp_path):
    root = emotion6_tree(tmp_path / "e6", extra_lines=[
        "joy/9.jpg\t5\t5\t0.5\t0.5\t0.5\t0\t0\t0\t0",  # probabilities sum to 1.5
        "joy/10.jpg\t5\t5\t0.1",  # too few fields
        "joy/11.jpg\t5\t5\t0\t0\t0\t1\t0\t0\t0",  # listed, image missing
    ])
    with pytest.raises(BadSampleError, match=r"ground_truth\.txt:7: sample 'joy/9.jpg': .*not a distribution"):
        load_emotion6(root)
    ds = load_emotion6(root, "skip")
    assert len(ds) == 5 and dict(ds.report.skipped) == {"malformed_line": 2, "missing_file": 1}
    assert "ground_truth.txt:8" in ds.report.summary()
    with pytest.raises(ValueError, match="argmax"):
        load_emotion6(root, label="mode")


def test_emotion6_validate_cli(tmp_path, capsys):
    root = emotion6_tree(tmp_path / "Emotion6")
    assert cli(["validate", str(root)]) == 0
    out = capsys.readouterr().out
    assert "layout emotion6" in out and "note: argmax_tie = 2" in out and "OK" in out, out


# ---------------------------------------------------------------------------------------------- WebEmo

CATEGORY = "('affection', 'love', '+')\n('cheerfullness', 'joy', '+')\n('confusion', 'confusion', '-')\n" \
           "('rage', 'anger', '-')\n"


def webemo_tree(root: Path, category=True) -> Path:
    (root / "images").mkdir(parents=True)
    if category:
        (root / "category.txt").write_text(CATEGORY)
    url = "https://as2.ftcdn.net/jpg/00/42/93/78/{}.jpg"
    train = [(url.format("220_F_a"), 0), (url.format("220_F_b"), 1), (url.format("220_F_c"), 3),
             (url.format("220_F_dead1"), 2), (url.format("220_F_dead2") + "?v=2", 0)]
    (root / "train25.txt").write_text("".join(f"{u} {i}\n" for u, i in train))
    (root / "test25.txt").write_text(f"{url.format('220_F_t')} 2\n")
    img(root / "images/220_F_a.jpg")
    img(root / "images/batch1/220_F_b.jpg")  # found below images/, wherever the download put it
    img(root / "images/220_F_c.jpg")
    img(root / "images/220_F_t.jpg")
    return root


def test_webemo_lists_levels_and_missing_downloads(tmp_path):
    root = webemo_tree(tmp_path / "webemo")
    ds = load_dataset(root, split="train")
    assert ds.report.layout == "webemo" and ds.taxonomy.name == "webemo25"
    assert [(s.id, s.label) for s in ds] == [("220_F_a.jpg", "affection"), ("220_F_b.jpg", "cheerfulness"),
                                             ("220_F_c.jpg", "rage")], "leaves from category.txt, dataset spelling"
    assert ds.report.notes["not_downloaded"] == 2 and ds.report.ok, "images never downloaded: counted, no problem"
    assert "not_downloaded=2" in ds.report.summary()
    assert ds[2].metadata == {"url": "https://as2.ftcdn.net/jpg/00/42/93/78/220_F_c.jpg", "label_index": 3,
                              "webemo25": "rage", "webemo7": "anger", "webemo2": "negative"}
    assert [s.label for s in load_webemo(root, "train", taxonomy="webemo7")] == ["love", "joy", "anger"]
    assert [s.label for s in load_webemo(root, "train", taxonomy="binary")] == ["positive", "positive", "negative"]
    with pytest.raises(BadSampleError, match=r"train25\.txt:4: sample '220_F_dead1.jpg': .*not in") as e:
        load_webemo(root, "train", missing="error")
    assert e.value.reason == "missing_file"
    assert dict(load_webemo(root, "train", "skip", missing="error").report.skipped) == {"missing_file": 2}
    assert len(load_dataset(root / "test25.txt")) == 1, "a list file alone is detected as WebEmo"
    with pytest.raises(ValueError, match="split="):
        load_webemo(root)
    with pytest.raises(ValueError, match="level"):
        load_webemo(root, "train", taxonomy="mikels8")


def test_webemo_bad_lines_and_no_category_file(tmp_path):
    root = webemo_tree(tmp_path / "w", category=False)
    with open(root / "train25.txt", "a") as f:
        f.write("https://x.net/220_F_a.jpg\n")  # no label
        f.write("https://x.net/220_F_c.jpg 99\n")  # no such index
    ds = load_webemo(root, "train", "skip")
    assert dict(ds.report.skipped) == {"malformed_line": 1, "unknown_label": 1}
    # without category.txt the index is webemo25's (alphabetical) order: 0 affection, 1 cheerfulness, 3 contentment
    assert [s.label for s in ds] == ["affection", "cheerfulness", "contentment"]


def test_webemo_validate_cli(tmp_path, capsys):
    root = webemo_tree(tmp_path / "webemo")
    assert cli(["validate", str(root)]) == 0
    out = capsys.readouterr().out
    assert "[train]" in out and "[test]" in out and "note: not_downloaded = 2" in out, out


# ---------------------------------------------------------------------------------------------- EmoSet subset

COUNTS = {"train": {"amusement": 10, "anger": 6, "awe": 4}, "test": {"fear": 3, "sadness": 5}}


def emoset_tree(root: Path, order_seed: int | None = None) -> Path:
    for split, counts in COUNTS.items():
        rows = []
        for label, n in counts.items():
            for k in range(n):
                name = f"{label}_{split}_{k:03d}"
                img(root / f"image/{label}/{name}.jpg", (8, 8))
                rows.append([label, name, f"image/{label}/{name}.jpg", f"annotation/{label}/{name}.json"])
        if order_seed is not None:
            random.Random(order_seed).shuffle(rows)
        (root / f"{split}.json").write_text(json.dumps(rows))
    return root


def test_stratified_counts_hand_derived():
    # 12 of (10, 6, 4): quotas 6, 3.6, 2.4 -> floors 6, 3, 2 and the one left goes to the largest remainder
    assert _stratified_counts({"amusement": 10, "anger": 6, "awe": 4}, 12) == {"amusement": 6, "anger": 4, "awe": 2}
    # equal remainders go by label order
    assert _stratified_counts({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}
    assert sum(_stratified_counts({"a": 1000, "b": 7, "c": 93}, 2100 // 3).values()) == 700


def test_emoset_subset_is_seeded_stratified_and_loads(tmp_path):
    root = emoset_tree(tmp_path / "EmoSet")
    paths = build_emoset_subset(root, tmp_path / "sub", sizes={"train": 12, "test": 4}, seed=3)
    train = load_dataset(tmp_path / "sub", split="train")
    assert train.label_counts()["amusement"] == 6 and train.label_counts()["anger"] == 4 \
        and train.label_counts()["awe"] == 2, "per-label counts follow the full split's proportions"
    test = load_dataset(paths["test"])  # 4 of (fear 3, sadness 5): quotas 1.5, 2.5, the tie goes by label order
    assert (test.label_counts()["fear"], test.label_counts()["sadness"]) == (2, 2)
    assert all(s.id.startswith(s.label + "_train_") for s in train), "rows keep EmoSet's image id and label"
    meta = json.loads((tmp_path / "sub/subset.json").read_text())
    assert meta["seed"] == 3 and meta["counts"]["train"] == {"amusement": 6, "anger": 4, "awe": 2, "contentment": 0,
                                                               "disgust": 0, "excitement": 0, "fear": 0, "sadness": 0}
    # the same files and seed give the same subset, whatever the order of the split file
    shuffled = emoset_tree(tmp_path / "EmoSet2", order_seed=1)
    build_emoset_subset(shuffled, tmp_path / "sub2", sizes={"train": 12, "test": 4}, seed=3)
    ids = lambda p: [json.loads(x)["id"] for x in Path(p).read_text().splitlines()]  # noqa: E731
    assert ids(tmp_path / "sub/train.jsonl") == ids(tmp_path / "sub2/train.jsonl")
    build_emoset_subset(root, tmp_path / "sub3", sizes={"train": 12, "test": 4}, seed=4)
    assert ids(tmp_path / "sub/train.jsonl") != ids(tmp_path / "sub3/train.jsonl"), "the seed must matter"
    with pytest.raises(ValueError, match="fewer than the 21"):
        build_emoset_subset(root, tmp_path / "sub4", sizes={"train": 21})


def test_emoset_subset_cli(tmp_path, capsys):
    root = emoset_tree(tmp_path / "EmoSet")
    assert cli(["emoset-subset", str(root), str(tmp_path / "sub"), "--train", "10", "--test", "8"]) == 0
    assert cli(["validate", str(tmp_path / "sub")]) == 0
    out = capsys.readouterr().out
    assert "[train]" in out and "[test]" in out and "OK" in out, out
    assert cli(["emoset-subset", str(root), str(tmp_path / "s2"), "--train", "100"]) == 2
