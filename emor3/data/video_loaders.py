"""Loaders for published video emotion datasets, in the layouts their authors distribute: DFEW and MAFW.

DFEW (Jiang et al., ACM MM 2020; dfew-dataset.github.io), 16,372 clips, 7 single labels, 5-fold cross-validation:
    DFEW/EmoLabel_DataSplit/train(single-labeled)/set_1.csv ... set_5.csv
    DFEW/EmoLabel_DataSplit/test(single-labeled)/set_1.csv ... set_5.csv
        `video_name,label` rows (a header line first), video_name the clip number, label 1..7 =
        happy, sad, neutral, angry, surprise, disgust, fear (`DFEW_LABELS`);
    the clips, each named by its number padded to 5 digits, as frame folders (`Clip/clip_224x224/00001/*.jpg`,
    `Clip/clip_224x224_16f/...`) or video files (`Clip/original/00001.mp4`); `clips=` picks the folder, else the
    first of `DFEW_CLIP_FOLDERS` that exists.
MAFW (Liu et al., ACM MM 2022; github.com/MAFW-database/MAFW), 10,045 clips, 11 single labels, 5 folds:
    MAFW/Train & Test Set/single/no_caption/set_1/train.txt, test.txt ... set_5/
        `<clip file> <label>` lines, e.g. `00025.mp4 anger`, label one of `MAFW_LABELS`;
    the clips as `data/clips/00025.mp4`, or frame folders `data/frames/00025/`; `clips=` picks, else clips if
    present, else frames.
    Only the single-label no-caption split files are read here (the compound and captioned sets are not).

`load_dfew(root, fold, split)` / `load_mafw(...)` return a `ClipDataset` of `ClipSample`s (id, clip path, canonical
label, taxonomy name) with a `LoadReport`. Checked per sample, with the reasons of `emor3.data.dataset`: malformed
row, label outside the taxonomy, missing clip (a frame folder without frames counts as missing), duplicate id; and
an empty result. `on_bad_sample="skip"` counts them instead of raising. Nothing is decoded at load time
(`verify="exists"`); `verify="full"` decodes every clip once (`emor3.models.clips.read_clip`; video files need the
`video` extra). `python -m emor3.data.video_loaders validate ROOT` prints the counts per fold, split and label.

The labels stay the datasets' own words: the taxonomies `dfew7` and `mafw11` (`emor3.data.taxonomy`, valence as the
datasets group them). `as_emotion_dataset` turns a loaded fold into clip samples (`ClipFiles`) for training and
evaluation, which is what `emor3.data.load_dataset("/data/DFEW@train1")` returns.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from emor3.data.clip_source import ClipFiles
from emor3.data.dataset import (DUPLICATE_ID, EMPTY_DATASET, MALFORMED_LINE, MISSING_FILE, UNKNOWN_LABEL,
                                UNREADABLE_IMAGE, BadSampleError, BadSampleHandler, EmotionDataset, LoadReport, Sample)
from emor3.data.taxonomy import DFEW7, MAFW11
from emor3.models.clips import FRAME_SUFFIXES, VIDEO_SUFFIXES, Clip, read_clip

DFEW_LABELS = DFEW7.labels  # split-file labels 1..7: happy, sad, neutral, angry, surprise, disgust, fear
MAFW_LABELS = MAFW11.labels
TAXONOMIES = {"dfew7": DFEW_LABELS, "mafw11": MAFW_LABELS}
TAXONOMY_OF = {"dfew7": DFEW7, "mafw11": MAFW11}
FOLDS = (1, 2, 3, 4, 5)
SPLITS = ("train", "test")
DFEW_SPLIT_DIR = "EmoLabel_DataSplit"
DFEW_CLIP_FOLDERS = ("Clip/clip_224x224", "Clip/clip_224x224_16f", "Clip/original", "Clip/jpg_256",
                     "clip_224x224", "clip_224x224_16f", "original")
MAFW_SPLIT_DIR = "Train & Test Set/single/no_caption"
MAFW_CLIP_FOLDERS = ("data/clips", "data/frames", "clips", "frames")
Verify = Literal["exists", "full"]


@dataclass
class ClipSample:
    """One clip: a video file or a folder of frames, its canonical label and taxonomy."""

    id: str
    clip: Path
    label: str
    taxonomy: str
    fps: float | None = None  # frame rate of a frame folder when known (a video file carries its own)
    metadata: dict = field(default_factory=dict)

    def open_clip(self) -> Clip:
        """All frames, decoded now."""
        return read_clip(self.clip, fps=self.fps)


@dataclass
class ClipDataset:
    samples: list[ClipSample]
    taxonomy: str
    report: LoadReport

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> ClipSample:
        return self.samples[i]

    def __iter__(self) -> Iterator[ClipSample]:
        return iter(self.samples)

    def label_counts(self) -> dict[str, int]:
        """Samples per label, in the taxonomy's order (labels without samples included, as 0)."""
        c = Counter(s.label for s in self.samples)
        return {lab: c.get(lab, 0) for lab in TAXONOMIES[self.taxonomy]}


def as_emotion_dataset(ds: ClipDataset, **dataset_kw) -> EmotionDataset:
    """The clips as an `EmotionDataset` of clip samples (`ClipFiles`), what training and evaluation read."""
    samples = [Sample(s.id, ClipFiles(path=s.clip, fps=s.fps), s.label, s.taxonomy, dict(s.metadata))
               for s in ds.samples]
    return EmotionDataset(samples, TAXONOMY_OF[ds.taxonomy], ds.report, **dataset_kw)


# ----------------------------------------------------------------------------------------------- shared checks
def _check_fold_split(fold: int, split: str) -> None:
    if fold not in FOLDS:
        raise ValueError(f"fold {fold} is not one of {FOLDS}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")


def _find_clip(folder: Path, name: str) -> Path | None:
    """The clip called `name` (a file name, or a stem) under `folder`: a frame folder or a video file."""
    stem = Path(name).stem if Path(name).suffix.lower() in VIDEO_SUFFIXES else name
    if (folder / stem).is_dir():
        return folder / stem
    if (folder / name).is_file():
        return folder / name
    for suffix in VIDEO_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _check_clip(path: Path, where: dict, verify: Verify, fps: float | None) -> None:
    """Raise BadSampleError (at `where`: the split file, line and sample id) when the clip cannot be used: no frames
    in a frame folder, or (verify="full") frames that do not decode."""
    if path.is_dir() and not any(p.suffix.lower() in FRAME_SUFFIXES for p in path.iterdir()):
        raise BadSampleError(MISSING_FILE, f"the frame folder {path} holds no frame images", **where)
    if verify == "full":
        try:
            read_clip(path, fps=fps)
        except (ValueError, OSError) as e:
            raise BadSampleError(UNREADABLE_IMAGE, f"the clip does not decode ({e})", **where) from e


def _resolve_clip_folder(root: Path, clips: str | Path | None, candidates: tuple[str, ...], name: str) -> Path:
    if clips is not None:
        folder = Path(clips) if Path(clips).is_absolute() else root / clips
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: {name} clip folder not found")
        return folder
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise FileNotFoundError(f"{root}: no {name} clip folder; expected one of {', '.join(candidates)} (or pass "
                            "clips=)")


def _shown(folder: Path, root: Path) -> str:
    """The clip folder as the report names it: relative to the root when inside it."""
    return str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder)


def _collect(rows, folder: Path, taxonomy: str, split_file: Path, report: LoadReport, handle: BadSampleHandler,
             verify: Verify, fps: float | None, meta: dict) -> ClipDataset:
    """rows: (line, clip name, label or None when the row is malformed, problem text) -> the checked samples."""
    samples, seen = [], {}
    for line, name, label, problem in rows:
        try:
            if label is None:
                raise BadSampleError(MALFORMED_LINE, problem, file=split_file, line=line)
            sid = Path(name).stem
            if label not in TAXONOMIES[taxonomy]:
                raise BadSampleError(UNKNOWN_LABEL, problem or f"label {label!r} is not one of {taxonomy}",
                                     file=split_file, line=line, sample_id=sid)
            if sid in seen:
                raise BadSampleError(DUPLICATE_ID, f"clip listed again (first on line {seen[sid]})",
                                     file=split_file, line=line, sample_id=sid)
            path = _find_clip(folder, name)
            if path is None:
                raise BadSampleError(MISSING_FILE, f"clip {name!r} not found under {folder}", file=split_file,
                                     line=line, sample_id=sid)
            _check_clip(path, dict(file=split_file, line=line, sample_id=sid), verify, fps)
            seen[sid] = line
            samples.append(ClipSample(sid, path, label, taxonomy, fps, dict(meta)))
        except BadSampleError as e:
            handle(e)
    report.loaded = len(samples)
    if not samples:
        raise BadSampleError(EMPTY_DATASET, f"no usable clips ({report.n_skipped} bad rows)", file=split_file)
    return ClipDataset(samples, taxonomy, report)


# ----------------------------------------------------------------------------------------------- DFEW
def dfew_split_file(root: str | Path, fold: int, split: str) -> Path:
    _check_fold_split(fold, split)
    return Path(root) / DFEW_SPLIT_DIR / f"{split}(single-labeled)" / f"set_{fold}.csv"


def load_dfew(root: str | Path, fold: int = 1, split: str = "train", *, clips: str | Path | None = None,
              on_bad_sample: str = "error", verify: Verify = "exists", fps: float | None = None) -> ClipDataset:
    """DFEW fold `fold` (1-5), split "train" or "test"; `fps`: the frame rate of frame-folder clips."""
    root = Path(root)
    split_file = dfew_split_file(root, fold, split)
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: DFEW split file not found (expected the EmoLabel_DataSplit folder "
                                "as distributed)")
    folder = _resolve_clip_folder(root, clips, DFEW_CLIP_FOLDERS, "DFEW")
    report = LoadReport(source=str(split_file), layout=f"dfew ({_shown(folder, root)})", taxonomy="dfew7")
    handle = BadSampleHandler(on_bad_sample, report)
    with split_file.open(newline="", encoding="utf-8-sig") as f:
        lines = list(enumerate(csv.reader(f), 1))
    rows = []
    for ln, cells in lines:
        cells = [c.strip() for c in cells]
        if not any(cells):
            continue
        if ln == 1 and cells and not cells[0].isdigit():
            continue  # the `video_name,label` header
        if len(cells) < 2 or not cells[0].isdigit() or not cells[1].lstrip("-").isdigit():
            rows.append((ln, ",".join(cells), None, f"expected `video_name,label` (two integers), got {cells}"))
            continue
        k = int(cells[1])
        label = DFEW_LABELS[k - 1] if 1 <= k <= len(DFEW_LABELS) else f"#{k}"
        rows.append((ln, f"{int(cells[0]):05d}", label, None if 1 <= k <= 7 else f"label {k} is not in 1..7"))
    return _collect(rows, folder, "dfew7", split_file, report, handle, verify, fps, {"fold": fold, "split": split})


# ----------------------------------------------------------------------------------------------- MAFW
def mafw_split_file(root: str | Path, fold: int, split: str) -> Path:
    _check_fold_split(fold, split)
    return Path(root) / MAFW_SPLIT_DIR / f"set_{fold}" / f"{split}.txt"


def load_mafw(root: str | Path, fold: int = 1, split: str = "train", *, clips: str | Path | None = None,
              on_bad_sample: str = "error", verify: Verify = "exists", fps: float | None = None) -> ClipDataset:
    """MAFW single-label fold `fold` (1-5), split "train" or "test"."""
    root = Path(root)
    split_file = mafw_split_file(root, fold, split)
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: MAFW split file not found (expected the 'Train & Test Set' folder "
                                "as distributed)")
    folder = _resolve_clip_folder(root, clips, MAFW_CLIP_FOLDERS, "MAFW")
    report = LoadReport(source=str(split_file), layout=f"mafw ({_shown(folder, root)})", taxonomy="mafw11")
    handle = BadSampleHandler(on_bad_sample, report)
    rows = []
    for ln, text in enumerate(split_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = text.split()
        if not parts:
            continue
        if len(parts) != 2:
            rows.append((ln, text, None, f"expected `<clip file> <label>`, got {text!r}"))
            continue
        rows.append((ln, parts[0], parts[1].lower(), None))
    return _collect(rows, folder, "mafw11", split_file, report, handle, verify, fps, {"fold": fold, "split": split})


# ----------------------------------------------------------------------------------------------- validate
LOADERS = {"dfew": (load_dfew, dfew_split_file), "mafw": (load_mafw, mafw_split_file)}


def detect(root: str | Path) -> str:
    """"dfew" or "mafw" from the split-file folder under `root`."""
    root = Path(root)
    if (root / DFEW_SPLIT_DIR).is_dir():
        return "dfew"
    if (root / MAFW_SPLIT_DIR).is_dir():
        return "mafw"
    raise ValueError(f"{root}: neither a DFEW root ({DFEW_SPLIT_DIR}/) nor a MAFW root ({MAFW_SPLIT_DIR}/)")


def validate(root: str | Path, *, dataset: str | None = None, folds=FOLDS, clips: str | Path | None = None,
             verify: Verify = "exists", out=None) -> int:
    """Load every fold and split present (skip mode), print samples per label and every problem; the number of
    problems (0: all clean). A fold whose split file is absent is a problem too."""
    out = out or sys.stdout
    dataset = dataset or detect(root)
    load, split_file = LOADERS[dataset]
    problems = 0
    for fold in folds:
        for split in SPLITS:
            name = f"{dataset} fold {fold} {split}"
            try:
                ds = load(root, fold, split, clips=clips, on_bad_sample="skip", verify=verify)
            except (FileNotFoundError, BadSampleError) as e:
                print(f"{name}: PROBLEM: {e}", file=out)
                problems += 1
                continue
            rep = ds.report
            print(f"{name}: {len(ds)} clips, layout {rep.layout}", file=out)
            print("  " + ", ".join(f"{lab} {n}" for lab, n in ds.label_counts().items()), file=out)
            if rep.skipped:
                problems += rep.n_skipped
                print(f"  PROBLEMS: {rep.n_skipped} bad rows: "
                      + ", ".join(f"{r}={n}" for r, n in sorted(rep.skipped.items())), file=out)
                for reason in sorted(rep.examples):
                    for msg in rep.examples[reason]:
                        print(f"    {msg}", file=out)
    print("OK: no problems found" if not problems else f"FAILED: {problems} problem(s)", file=out)
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emor3.data.video_loaders",
                                description="Check a DFEW or MAFW root: clips per fold, split and label, and every "
                                            "problem found.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate")
    v.add_argument("root")
    v.add_argument("--dataset", choices=sorted(LOADERS), default=None, help="default: detected from the layout")
    v.add_argument("--fold", type=int, choices=FOLDS, default=None, help="only this fold (default: all five)")
    v.add_argument("--clips", default=None, help="the clip folder, relative to the root (default: detected)")
    v.add_argument("--verify", choices=("exists", "full"), default="exists",
                   help="exists: clip files and frame folders are present; full: decode every clip")
    args = p.parse_args(argv)
    try:
        n = validate(args.root, dataset=args.dataset, folds=(args.fold,) if args.fold else FOLDS, clips=args.clips,
                     verify=args.verify)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
