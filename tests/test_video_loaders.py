"""DFEW and MAFW loaders (emor3.data.video_loaders) on small folders built here in the layouts the datasets are
distributed in: 5-fold split files, clips as frame folders or video files; validate's counts per fold, split and
label, and every kind of bad row counted with the file and line named."""

import io
import shutil

import pytest
from PIL import Image

from emor3.data.dataset import BadSampleError
from emor3.data.video_loaders import MAFW_LABELS, MAFW_SPLIT_DIR, load_dfew, load_mafw, main, validate

N = 14  # clips in each toy dataset


def frames(folder, n=3):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 12), (20 * i, 100, 0)).save(folder / f"{i + 1:03d}.jpg")


def build_dfew(root):
    """Clip i (1..N) has label (i - 1) % 7 + 1; fold k tests on the clips with i % 5 == k - 1."""
    for i in range(1, N + 1):
        frames(root / "Clip" / "clip_224x224" / f"{i:05d}")
    for k in range(1, 6):
        for split in ("train", "test"):
            d = root / "EmoLabel_DataSplit" / f"{split}(single-labeled)"
            d.mkdir(parents=True, exist_ok=True)
            ids = [i for i in range(1, N + 1) if (i % 5 == k - 1) == (split == "test")]
            (d / f"set_{k}.csv").write_text("video_name,label\n" + "".join(f"{i},{(i - 1) % 7 + 1}\n" for i in ids))
    return root


def build_mafw(root, as_frames=False):
    """Clip i has label MAFW_LABELS[(i - 1) % 11]; folds as DFEW's."""
    for i in range(1, N + 1):
        if as_frames:
            frames(root / "data" / "frames" / f"{i:05d}")
        else:
            (root / "data" / "clips").mkdir(parents=True, exist_ok=True)
            (root / "data" / "clips" / f"{i:05d}.mp4").write_bytes(b"\x00")
    for k in range(1, 6):
        d = root / MAFW_SPLIT_DIR / f"set_{k}"
        d.mkdir(parents=True)
        for split in ("train", "test"):
            ids = [i for i in range(1, N + 1) if (i % 5 == k - 1) == (split == "test")]
            (d / f"{split}.txt").write_text("".join(f"{i:05d}.mp4 {MAFW_LABELS[(i - 1) % 11]}\n" for i in ids))
    return root


def test_dfew_folds_labels_and_clips(tmp_path):
    root = build_dfew(tmp_path / "DFEW")
    train, test = load_dfew(root, 1, "train"), load_dfew(root, 1, "test")
    assert [s.id for s in test] == ["00005", "00010"] and len(train) == N - 2
    assert (test[0].label, test[1].label) == ("surprise", "neutral")  # split-file labels 5 and 3
    assert test[0].clip == root / "Clip" / "clip_224x224" / "00005" and test[0].taxonomy == "dfew7"
    assert train.label_counts()["happy"] == 2 and sum(train.label_counts().values()) == N - 2
    assert train.report.ok and train.report.layout == "dfew (Clip/clip_224x224)"
    clip = load_dfew(root, 2, "test", fps=25, verify="full")[0].open_clip()
    assert clip.frames.shape == (3, 3, 12, 16) and clip.fps == 25


def test_dfew_bad_rows_are_counted_or_raised(tmp_path):
    root = build_dfew(tmp_path / "DFEW")
    f = root / "EmoLabel_DataSplit" / "test(single-labeled)" / "set_1.csv"
    shutil.rmtree(root / "Clip" / "clip_224x224" / "00010")  # missing clip
    (root / "Clip" / "clip_224x224" / "00099").mkdir()  # a frame folder without frames
    f.write_text(f.read_text() + "5,5\n12,9\nabc\n99,1\n")  # duplicate, label 9, malformed, empty folder
    with pytest.raises(BadSampleError, match=r"set_1.csv:3: sample '00010': clip '00010' not found"):
        load_dfew(root, 1, "test")
    ds = load_dfew(root, 1, "test", on_bad_sample="skip")
    assert [s.id for s in ds] == ["00005"]
    assert dict(ds.report.skipped) == {"missing_file": 2, "duplicate_id": 1, "unknown_label": 1,
                                       "malformed_line": 1}
    out = io.StringIO()
    assert validate(root, out=out) == 9  # the 5 above, and clip 10 missing from the train splits of folds 2-5
    text = out.getvalue()
    assert "dfew fold 1 test: 1 clips" in text and "dfew fold 2 train: 10 clips" in text
    assert "set_1.csv:5: sample '00012': label 9 is not in 1..7 [unknown_label]" in text
    assert "set_1.csv:7: sample '00099': the frame folder" in text
    assert "FAILED: 9 problem(s)" in text


def test_mafw_clips_frames_and_validate(tmp_path, capsys):
    root = build_mafw(tmp_path / "MAFW")
    ds = load_mafw(root, 3, "test")
    assert [(s.id, s.label, s.clip.name) for s in ds] == [("00002", "disgust", "00002.mp4"),
                                                          ("00007", "surprise", "00007.mp4"),
                                                          ("00012", "anger", "00012.mp4")]
    assert ds.taxonomy == "mafw11" and ds.report.layout == "mafw (data/clips)"
    assert main(["validate", str(root)]) == 0
    out = capsys.readouterr().out
    assert "mafw fold 1 train: 12 clips, layout mafw (data/clips)" in out and "OK: no problems found" in out
    assert "  anger 2, disgust 2, fear 2, happiness 1, neutral 0" in out
    frames_root = build_mafw(tmp_path / "MAFW_frames", as_frames=True)
    assert load_mafw(frames_root, 1, "train")[0].clip == frames_root / "data" / "frames" / "00001"
    # a label outside the 11 and a missing split file
    f = root / MAFW_SPLIT_DIR / "set_1" / "train.txt"
    f.write_text(f.read_text() + "00003.mp4 boredom\n")
    with pytest.raises(BadSampleError, match="train.txt:13: sample '00003': label 'boredom' is not one of mafw11"):
        load_mafw(root, 1, "train")
    (root / MAFW_SPLIT_DIR / "set_5" / "test.txt").unlink()
    assert main(["validate", str(root), "--fold", "5"]) == 1
    assert "mafw fold 5 test: PROBLEM" in capsys.readouterr().out
    assert main(["validate", str(tmp_path)]) == 2  # neither layout
