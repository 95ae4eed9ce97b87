"""Dataset loaders: JSONL manifests (ours and EasyR1 rows), image-folder trees, and the published layouts of
EmoSet, Emotion6 and WebEmo.

`load_dataset(path, taxonomy=None, on_bad_sample="error")` detects the layout:
- a `.jsonl` file (or a `.json` file holding a list of objects): a manifest, one JSON object per line:
    {"image": "images/0001.png", "label": "awe", "taxonomy": "mikels8", "id": "0001", ...}
  `image` is relative to the manifest's folder (absolute paths are kept); `taxonomy` and `id` are optional; every
  other key goes into the sample's metadata (EmoScenes keeps its ground-truth `cues` and cold-start `response`
  there). EasyR1-style rows are accepted too: {"images": ["a.jpg"], "problem": "...", "answer": "awe"} (one image
  per row; `answer` may be wrapped in \\boxed{}; `problem`, its `<image>` markers removed, becomes the
  sample's `question`, as does a `question` key in our rows: the user's own question wording).
  A clip row names its clip instead of an image: {"frames": ["f/0.png", "f/1.png", ...], "fps": 2, "label": ...}
  or {"video": "clips/0001.gif", ...} (a folder of frames, an animated GIF / WebP, or a video file read through
  PyAV); its sample's `image` is then a `ClipFiles` (`emor3.data.clip_source`). Its files must exist; verify="full"
  decodes it.
- a DFEW or MAFW root as their authors distribute them, with the split and fold as `PATH@train1` ... `@test5`:
  clip samples in the `dfew7` / `mafw11` taxonomy (`emor3.data.video_loaders`, `load_video_dataset`).
- a folder with `train.json` / `val.json` / `test.json` next to `image/` and `annotation/` folders, or one of those
  split files itself: EmoSet (Yang et al., ICCV 2023, github.com/JingyuanYY/EmoSet README): each split file is a
  JSON list of `[emotion, image_id, image_path, annotation_path]` (paths relative to the root); the 3-element
  `[emotion, image_path, annotation_path]` rows some copies use are accepted too. The annotation JSON (brightness,
  colorfulness, scene, object, facial_expression, human_action) goes into metadata["annotation"]. Taxonomy mikels8.
- a folder with `ground_truth.txt` (or that file itself): Emotion6 as distributed, `images/<keyword>/<n>.jpg`
  plus per-image valence, arousal and emotion probabilities; the label is the argmax (`load_emotion6`).
- a folder with `train25.txt` / `test25.txt` (or such a `<url> <label index>` list itself): WebEmo's URL lists,
  with `category.txt` and the images downloaded below `images/`; images never downloaded are counted in
  `report.notes`, not errors (`load_webemo`).
- any other folder: an image-folder tree `root/<label>/<file>` (FI, ArtPhoto ship this way); files in
  nested folders below a label folder count for that label.
- a Hugging Face dataset folder of parquet shards, as the hub writes them (`train-00000-of-00001.parquet`,
  `test-*.parquet`, in the folder or its `data/` folder), or one shard: EasyR1's `problem` / `answer` / `images`
  columns, images as bytes or paths, and the release's coarse answer column (`load_parquet`; needs pyarrow, the
  `parquet` extra). The release's training data, `fuyyy74/EmoSet2k`, downloads this way.
A folder holding several manifests (e.g. written by `python -m emor3.data emoscenes`), EmoSet, WebEmo or parquet
splits needs `split=`, or EasyR1's `PATH@SPLIT` (`--data /data/EmoSet2k@train`). `build_emoset_subset` writes the
paper's 2,100 / 2,000 EmoSet subset as manifests, seeded and stratified.

Ids are stable across runs: the row's `id` if given, else the image path relative to the dataset root.
Without a taxonomy (argument or per-row field) the built-in one that recognises the most labels is used; a tie
is an error asking for `taxonomy=`. A per-row `taxonomy` field wins over the argument, which is the default for
rows without one.

Checked per sample (reasons in emor3.data.dataset.REASONS): missing file, unreadable or truncated image (verify=
"full", the default, decodes each image once at load time and drops the pixels; "header" only opens it),
zero-size image, unknown label, malformed JSON line or row, duplicate id; and an empty result.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

from emor3.data.dataset import (
    DUPLICATE_ID, IMAGE_SHAPE, MALFORMED_LINE, MISSING_FILE, UNKNOWN_LABEL, UNREADABLE_IMAGE, ZERO_SIZE_IMAGE,
    BadSampleError, BadSampleHandler, BytesImage, EmotionDataset, ImageBudget, LoadReport, Sample, check_image_file,
    write_atomic,
)
from emor3.data import video_loaders
from emor3.data.clip_source import ClipFiles
from emor3.data.taxonomy import BUILTIN_NAMES, Taxonomy, get_taxonomy

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_JUNK = {"thumbs.db", "desktop.ini"}
EMOSET_SPLITS = ("train", "val", "test")
_BOXED = re.compile(r"\\boxed\{(.*)\}", re.S)
_IMAGE_MARKER = re.compile(r"[ \t]*<image>[ \t]*")  # EasyR1's image placeholder inside `problem`


class _Row:
    """A parsed row before its taxonomy and label are resolved."""

    __slots__ = ("id", "image", "label", "taxonomy", "metadata", "line", "file", "question", "row")

    def __init__(self, id, image, label, taxonomy, metadata, line, file, question=None, row=None):
        self.id, self.image, self.label, self.taxonomy = id, image, label, taxonomy
        self.metadata, self.line, self.file, self.question, self.row = metadata, line, file, question, row


def _infer_taxonomy(labels: list[str], source: Any) -> Taxonomy:
    """The built-in taxonomy recognising the most of `labels`; a tie is an error."""
    scores = {name: sum(get_taxonomy(name).canonical(x) is not None for x in labels) for name in BUILTIN_NAMES}
    best = max(scores.values())
    winners = [n for n, s in scores.items() if s == best]
    if len(winners) > 1 and best > 0:
        # webemo2 duplicates binary: prefer the plain name rather than calling it ambiguous
        winners = [w for w in winners if w != "webemo2"] if set(winners) == {"binary", "webemo2"} else winners
    if best == 0 or len(winners) > 1:
        found = sorted(set(labels))[:12]
        raise ValueError(f"{source}: cannot tell the taxonomy from the labels {found}: "
                         + (f"they fit {winners} equally; " if best else "no built-in taxonomy knows them; ")
                         + "pass taxonomy= (or --taxonomy NAME|FILE)")
    return get_taxonomy(winners[0])


def _finish(rows: list[_Row], taxonomy: Taxonomy | str | None, report: LoadReport, handle: BadSampleHandler,
            check: Callable[[_Row], None], dataset_kw: dict) -> EmotionDataset:
    """Resolve taxonomies and labels, check ids and images, build the dataset."""
    default_tax = get_taxonomy(taxonomy) if taxonomy is not None else None
    if default_tax is None and any(r.taxonomy is None for r in rows) and rows:
        default_tax = _infer_taxonomy([r.label for r in rows if r.taxonomy is None], report.source)
    samples: list[Sample] = []
    seen: dict[str, Any] = {}
    used_taxonomies = set()
    for r in rows:
        try:
            try:
                tax = get_taxonomy(r.taxonomy) if r.taxonomy is not None else default_tax
            except (KeyError, ValueError, FileNotFoundError) as e:
                raise BadSampleError(UNKNOWN_LABEL, f"unknown taxonomy {r.taxonomy!r} ({e})", file=r.file,
                                     line=r.line, sample_id=r.id, row=r.row) from None
            canon = tax.canonical(r.label)
            if canon is None:
                raise BadSampleError(UNKNOWN_LABEL, f"label {r.label!r} is not in taxonomy {tax.name!r} "
                                     f"{list(tax.labels)}", file=r.file, line=r.line, sample_id=r.id, row=r.row)
            if r.id in seen:
                raise BadSampleError(DUPLICATE_ID, f"id {r.id!r} was already used at {seen[r.id]}", file=r.file,
                                     line=r.line, sample_id=r.id, row=r.row)
            check(r)
        except BadSampleError as err:
            handle(err)
            continue
        seen[r.id] = f"line {r.line}" if r.line is not None else f"row {r.row}" if r.row is not None else str(r.image)
        used_taxonomies.add(tax.name)
        samples.append(Sample(r.id, r.image, canon, tax.name, r.metadata, r.question))
    one = get_taxonomy(next(iter(used_taxonomies))) if len(used_taxonomies) == 1 else None
    if one is not None:
        report.taxonomy = one.name
    elif used_taxonomies:
        report.taxonomy = "mixed: " + ",".join(sorted(used_taxonomies))
    return EmotionDataset(samples, one, report, **dataset_kw)


def _image_check(verify: str, dataset_kw: dict) -> Callable[[_Row], None]:
    """The per-row image check at the pixel budget the dataset will use (Qwen2.5-VL's when none is given)."""
    budget = ImageBudget.from_kw(dataset_kw)

    def check(r: _Row) -> None:
        if isinstance(r.image, ClipFiles):
            _check_clip(r, verify)
            return
        if not isinstance(r.image, Path):
            return
        try:
            check_image_file(r.image, verify=verify, file=r.file, line=r.line, sample_id=r.id, budget=budget)
        except BadSampleError as e:
            if r.row is None:
                raise
            raise BadSampleError(e.reason, e.problem, file=r.file, sample_id=r.id, row=r.row) from None
    return check


def _check_clip(r: _Row, verify: str) -> None:
    """A clip row's files exist (every frame, or the clip path); with verify="full" the clip also decodes."""
    missing = r.image.missing()
    if missing:
        raise BadSampleError(MISSING_FILE, f"clip file {missing[0]} does not exist ({len(missing)} missing)",
                             file=r.file, line=r.line, sample_id=r.id)
    if verify == "full":
        try:
            r.image.open_clip()
        except (ValueError, OSError, ImportError) as e:
            raise BadSampleError(UNREADABLE_IMAGE, f"the clip does not decode ({e})", file=r.file, line=r.line,
                                 sample_id=r.id) from None


def decode_text(data: bytes, file: Path, line: int | None = None) -> str:
    """UTF-8 text (a leading BOM dropped), or a BadSampleError naming the line and column of the first bad byte.

    `line` None: `data` is a whole file, and the line is counted from the bad byte's offset."""
    try:
        return data.decode("utf-8-sig" if line in (None, 1) else "utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        ln = line if line is not None else before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        raise BadSampleError(MALFORMED_LINE, f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {col} "
                             "(save the file as UTF-8)", file=file, line=ln) from None


def read_lines(path: Path, handle: BadSampleHandler) -> list[tuple[int, str]]:
    """(line number, text) of every line of a text file, each decoded on its own: a line that is not UTF-8 is
    that line's problem (an error naming it, or counted and left out under skip), not the whole file's."""
    out = []
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            try:
                out.append((ln, decode_text(raw, path, ln)))
            except BadSampleError as err:
                handle(err)
    return out


def read_json_file(path: Path) -> Any:
    """A whole JSON file; bad UTF-8 or bad JSON is a BadSampleError naming the file and line."""
    text = decode_text(path.read_bytes(), path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSampleError(MALFORMED_LINE, f"not valid JSON: {e.msg}", file=path, line=e.lineno) from None


# ---------------------------------------------------------------------------------------------------------------
# JSONL manifest


def _manifest_row(obj: Any, base: Path, file: Path, line: int) -> _Row:
    def bad(problem: str, sid: Any = None) -> BadSampleError:
        return BadSampleError(MALFORMED_LINE, problem, file=file, line=line, sample_id=sid)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    obj = dict(obj)
    sid = obj.pop("id", None)
    sid = None if sid is None else str(sid)
    if "images" in obj and "image" not in obj:  # EasyR1 row
        images = obj.pop("images")
        if isinstance(images, (str, dict)):
            images = [images]
        if not isinstance(images, list) or len(images) != 1:
            n = len(images) if isinstance(images, list) else type(images).__name__
            raise bad(f"'images' must hold exactly one image (emor3 uses one image per prompt), got {n}", sid)
        image = images[0]
        label = obj.pop("answer", obj.pop("label", None))
        if isinstance(label, str):
            m = _BOXED.search(label)
            label = m.group(1) if m else label
        question = obj.pop("problem", obj.pop("question", None))
    elif ("frames" in obj or "video" in obj) and "image" not in obj:  # a clip: frame files, or one clip path
        image = _clip_files(obj.pop("frames", None), obj.pop("video", None), obj.pop("fps", None), base, bad, sid)
        label = obj.pop("label", None)
        question = obj.pop("question", None)
    else:
        image = obj.pop("image", None)
        label = obj.pop("label", None)
        question = obj.pop("question", None)
    if question is not None:
        if not isinstance(question, str):
            raise bad(f"'question' / 'problem' must be a string, got {type(question).__name__}", sid)
        question = _IMAGE_MARKER.sub(" ", question).strip() or None
    if isinstance(image, ClipFiles):
        if not isinstance(label, str) or not label.strip():
            raise bad("missing 'label', or it is not a string", sid)
        if sid is None:
            sid = Path(obj.get("video") or (image.path or image.frames[0].parent)).as_posix()
        return _Row(sid, image, label, obj.pop("taxonomy", None), obj, line, file, question)
    if isinstance(image, dict):
        image = image.get("path")
    if not isinstance(image, str) or not image:
        raise bad("missing 'image' (a path relative to the manifest) or EasyR1 'images'", sid)
    if not isinstance(label, str) or not label.strip():
        raise bad("missing 'label' (or EasyR1 'answer'), or it is not a string", sid)
    tax = obj.pop("taxonomy", None)
    path = Path(image)
    path = path if path.is_absolute() else base / path
    if sid is None:
        sid = Path(image).as_posix()
    return _Row(sid, path, label, tax, obj, line, file, question)


def _clip_files(frames: Any, video: Any, fps: Any, base: Path, bad, sid) -> ClipFiles:
    """A manifest row's clip: `frames` (a list of frame files) or `video` (a folder of frames, a GIF / WebP or a
    video file), paths relative to the manifest's folder, and an optional `fps` (required in practice for frames)."""
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise bad(f"'fps' must be a positive number, got {fps!r}", sid)
    at = lambda p: Path(p) if Path(p).is_absolute() else base / p  # noqa: E731
    if frames is not None:
        if video is not None:
            raise bad("a clip row has either 'frames' or 'video', not both", sid)
        if not isinstance(frames, list) or not frames or not all(isinstance(f, str) and f for f in frames):
            raise bad("'frames' must be a non-empty list of frame file paths", sid)
        return ClipFiles(tuple(at(f) for f in frames), None, None if fps is None else float(fps))
    if not isinstance(video, str) or not video:
        raise bad("'video' must be a path (a folder of frames, a GIF / WebP or a video file)", sid)
    return ClipFiles((), at(video), None if fps is None else float(fps))


def load_manifest(path: str | Path, taxonomy: Taxonomy | str | None = None, on_bad_sample: str = "error", *,
                  verify: str = "full", **dataset_kw) -> EmotionDataset:
    """A JSONL manifest (or a .json list of row objects); see the module docstring for the row shapes."""
    path = Path(path)
    report = LoadReport(str(path), "jsonl")
    handle = BadSampleHandler(on_bad_sample, report)
    if not path.is_file():
        raise BadSampleError(MISSING_FILE, "manifest file does not exist", file=path)
    base = path.parent
    rows: list[_Row] = []
    if path.suffix.lower() == ".json":
        report.layout = "json"
        doc = read_json_file(path)
        entries = [(i + 1, obj) for i, obj in enumerate(doc if isinstance(doc, list) else [doc])]
    else:
        entries = []
        for ln, text in read_lines(path, handle):
            if not text.strip():
                continue  # blank lines are layout, not samples
            try:
                entries.append((ln, json.loads(text)))
            except json.JSONDecodeError as e:
                handle(BadSampleError(MALFORMED_LINE, f"not valid JSON ({e.msg} at column {e.colno})",
                                      file=path, line=ln))
    for ln, obj in entries:
        try:
            rows.append(_manifest_row(obj, base, path, ln))
        except BadSampleError as err:
            handle(err)
    return _finish(rows, taxonomy, report, handle, _image_check(verify, dataset_kw), dataset_kw)


# ---------------------------------------------------------------------------------------------------------------
# image folder


def load_image_folder(root: str | Path, taxonomy: Taxonomy | str | None = None, on_bad_sample: str = "error", *,
                      verify: str = "full", **dataset_kw) -> EmotionDataset:
    """root/<label>/<file> (files in deeper folders count for their top-level label folder)."""
    root = Path(root)
    report = LoadReport(str(root), "image-folder")
    handle = BadSampleHandler(on_bad_sample, report)
    if not root.is_dir():
        raise BadSampleError(MISSING_FILE, "dataset folder does not exist", file=root)
    rows: list[_Row] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name.lower() in _JUNK:
            continue
        if entry.is_file():
            if entry.suffix.lower() in IMAGE_EXTENSIONS:  # an image outside any label folder has no label
                handle(BadSampleError(UNKNOWN_LABEL, "image is not inside a <label>/ folder, so it has no label",
                                      file=entry, sample_id=entry.name))
            continue  # README, license files etc. next to the label folders are not samples
        for f in sorted(entry.rglob("*")):
            rel = f.relative_to(root)
            if not f.is_file() or any(p.startswith(".") for p in rel.parts) or f.name.lower() in _JUNK:
                continue
            rows.append(_Row(rel.as_posix(), f, entry.name, None, {"folder": entry.name}, None, f))
    folder_tax = taxonomy
    if folder_tax is None and rows:
        folder_tax = _infer_taxonomy(sorted({r.label for r in rows}), root)

    budget = ImageBudget.from_kw(dataset_kw)

    def check(r: _Row) -> None:
        if r.image.suffix.lower() not in IMAGE_EXTENSIONS:
            raise BadSampleError(UNREADABLE_IMAGE, f"not an image file (extension {r.image.suffix!r})",
                                 file=r.file, sample_id=r.id)
        check_image_file(r.image, verify=verify, file=r.file, line=None, sample_id=r.id, budget=budget)

    return _finish(rows, folder_tax, report, handle, check, dataset_kw)


# ---------------------------------------------------------------------------------------------------------------
# EmoSet


def _split_file(path: Path, split: str | None, splits, name: str, folder: str, file: str) -> tuple[Path, Path]:
    """(split file, dataset root) of a published layout given its root folder or one split file. ``name`` formats
    a split's file name (``{split}``); a root holding exactly one split needs no ``split``."""
    if not path.is_dir():
        return path, path.parent
    if split is None:
        present = [s for s in splits if (path / name.format(split=s)).is_file()]
        if len(present) != 1:
            raise ValueError(f"{path}: {folder} {present}: pass split= (or the {file})")
        split = present[0]
    return path / name.format(split=split), path


def load_emoset(path: str | Path, split: str | None = None, on_bad_sample: str = "error", *,
                taxonomy: Taxonomy | str | None = None, annotations: bool = True, verify: str = "full",
                **dataset_kw) -> EmotionDataset:
    """EmoSet: `path` is the root (then `split` picks train/val/test) or a split file itself."""
    path = Path(path)
    split_file, root = _split_file(path, split, EMOSET_SPLITS, "{split}.json", "EmoSet root with splits", "split file")
    report = LoadReport(str(split_file), "emoset")
    handle = BadSampleHandler(on_bad_sample, report)
    if not split_file.is_file():
        raise BadSampleError(MISSING_FILE, "EmoSet split file does not exist", file=split_file)
    doc = read_json_file(split_file)
    if not isinstance(doc, list):
        raise BadSampleError(MALFORMED_LINE, "an EmoSet split file is a JSON list of rows", file=split_file)
    rows: list[_Row] = []
    for i, item in enumerate(doc):
        entry = f"entry {i}"
        if (isinstance(item, list) and len(item) in (3, 4) and all(isinstance(x, str) for x in item)):
            label, img, ann = (item[0], item[2], item[3]) if len(item) == 4 else (item[0], item[1], item[2])
            sid = item[1] if len(item) == 4 else Path(img).stem
            rows.append(_Row(sid, root / img, label, None, {"annotation_path": str(root / ann), "entry": i},
                             None, split_file))
        else:
            handle(BadSampleError(MALFORMED_LINE, f"{entry}: expected [emotion, image_id, image_path, "
                                  f"annotation_path], got {str(item)[:80]}", file=split_file))
    image_check = _image_check(verify, dataset_kw)

    def check(r: _Row) -> None:
        image_check(r)
        if not annotations:
            return
        ann = Path(r.metadata["annotation_path"])
        try:
            r.metadata["annotation"] = json.loads(ann.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadSampleError(MISSING_FILE, f"annotation file {ann} does not exist", file=r.file,
                                 sample_id=r.id) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSampleError(MALFORMED_LINE, f"annotation file {ann} is not valid JSON ({e})", file=r.file,
                                 sample_id=r.id) from None

    return _finish(rows, taxonomy or "mikels8", report, handle, check, dataset_kw)


# ---------------------------------------------------------------------------------------------------------------
# Emotion6


EMOTION6_COLUMNS = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")  # ground_truth.txt order
EMOTION6_LABEL_RULES = ("argmax", "folder")


def _emotion6_row(text: str, ln: int, file: Path, images: Path, label_rule: str, report: LoadReport) -> _Row | None:
    """One ground_truth.txt line -> a row, None for the header line, BadSampleError for a malformed line."""
    fields = text.split()
    if not fields:
        return None
    try:
        numbers = [float(x) for x in fields[1:]]
    except ValueError:
        if ln == 1:
            return None  # the header line ("[image_filename] [valence] ...")
        raise BadSampleError(MALFORMED_LINE, f"expected a file name and 9 numbers, got {text.strip()[:80]!r}",
                             file=file, line=ln) from None
    if len(fields) != 10:
        raise BadSampleError(MALFORMED_LINE, f"expected a file name and 9 numbers (valence, arousal, 7 "
                             f"probabilities), got {len(fields)} fields", file=file, line=ln)
    name = fields[0]
    valence, arousal, probs = numbers[0], numbers[1], numbers[2:]
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs) or abs(sum(probs) - 1.0) > 1e-3:
        raise BadSampleError(MALFORMED_LINE, f"the 7 emotion probabilities {probs} are not a distribution "
                             "(each in [0, 1], summing to 1)", file=file, line=ln, sample_id=name)
    keyword = Path(name).parts[0] if len(Path(name).parts) > 1 else None  # images/<keyword>/<n>.jpg
    if label_rule == "folder":
        if keyword is None:
            raise BadSampleError(UNKNOWN_LABEL, f"{name!r} is not inside an emotion folder", file=file, line=ln,
                                 sample_id=name)
        label = keyword
    else:
        six = probs[:6]
        best = max(six)
        tied = [EMOTION6_COLUMNS[i] for i, p in enumerate(six) if p == best]
        if best == 0.0:  # every vote was "neutral": no emotion to take the argmax of
            if keyword is None:
                raise BadSampleError(UNKNOWN_LABEL, "all six emotion probabilities are 0 and the image is not "
                                     "inside an emotion folder", file=file, line=ln, sample_id=name)
            label = keyword
            report.notes["label_from_folder"] += 1
        elif len(tied) > 1:
            label = keyword if keyword in tied else tied[0]
            report.notes["argmax_tie"] += 1
        else:
            label = tied[0]
    metadata = {"valence": valence, "arousal": arousal, "distribution": dict(zip(EMOTION6_COLUMNS, probs)),
                "keyword": keyword}
    return _Row(name, images / name, label, None, metadata, ln, file)


def load_emotion6(path: str | Path, on_bad_sample: str = "error", *, label: str = "argmax",
                  taxonomy: Taxonomy | str | None = None, verify: str = "full", **dataset_kw) -> EmotionDataset:
    """Emotion6 as distributed (Peng et al., CVPR 2015): `path` is its root (or the ground_truth.txt in it),
    holding `images/<keyword>/<n>.jpg` (the six search keywords, 330 images each) and `ground_truth.txt`: a
    header line, then per image, tab-separated, `<keyword>/<n>.jpg valence arousal p_anger p_disgust p_fear
    p_joy p_sadness p_surprise p_neutral` (the share of the user-study votes for each of the 7 categories).

    label="argmax" (default; the usual single-label reading of Emotion6): the emotion with the highest
    probability among the six, neutral left out because the taxonomy (and the task) has no neutral label. Ties go
    to the search keyword if it is among the tied emotions, else to the first tied one in the column order above;
    an image whose six probabilities are all 0 (every vote neutral) takes its keyword. Both cases are counted in
    `report.notes` (argmax_tie, label_from_folder). label="folder": the search keyword, for every image.
    The distribution, valence, arousal and keyword go into metadata. Taxonomy emotion6.
    """
    path = Path(path)
    if label not in EMOTION6_LABEL_RULES:
        raise ValueError(f"Emotion6 label must be one of {EMOTION6_LABEL_RULES}, got {label!r}")
    gt = path if path.is_file() else path / "ground_truth.txt"
    root = gt.parent
    report = LoadReport(str(gt), "emotion6")
    handle = BadSampleHandler(on_bad_sample, report)
    if not gt.is_file():
        raise BadSampleError(MISSING_FILE, "Emotion6 ground_truth.txt does not exist", file=gt)
    images = root / "images" if (root / "images").is_dir() else root
    rows: list[_Row] = []
    for ln, text in read_lines(gt, handle):
        try:
            row = _emotion6_row(text, ln, gt, images, label, report)
        except BadSampleError as err:
            handle(err)
            continue
        if row is not None:
            rows.append(row)
    return _finish(rows, taxonomy or "emotion6", report, handle, _image_check(verify, dataset_kw), dataset_kw)


# ---------------------------------------------------------------------------------------------------------------
# WebEmo


WEBEMO_SPLITS = ("train", "test")
WEBEMO_LIST = "{split}25.txt"
_CATEGORY = re.compile(r"\(\s*'([^']*)'\s*,\s*'([^']*)'\s*,\s*'([+-])'\s*\)")
_WEBEMO_LEVELS = {"webemo25": 0, "webemo7": 1, "webemo2": 2, "binary": 2}


def read_webemo_categories(path: Path) -> list[tuple[str, str, str]]:
    """category.txt: one `('affection', 'love', '+')` tuple per label index, in index order: the 25-level leaf,
    its level-2 parent and the level-1 sign. -> [(leaf, parent, "positive" | "negative")]."""
    text = decode_text(path.read_bytes(), path)
    found = [(leaf, parent, "positive" if sign == "+" else "negative") for leaf, parent, sign in _CATEGORY.findall(text)]
    if not found:
        raise BadSampleError(MALFORMED_LINE, "no ('leaf', 'parent', '+'|'-') entries found", file=path)
    return found


def _webemo_default_categories() -> list[tuple[str, str, str]]:
    """Without category.txt: index i is WEBEMO25's i-th label (the dataset's alphabetical order, index 0 =
    affection as its README says), with the taxonomy's parents and valences."""
    t = get_taxonomy("webemo25")
    return [(leaf, t.parents[leaf], t.valence[leaf]) for leaf in t.labels]


def load_webemo(path: str | Path, split: str | None = None, on_bad_sample: str = "error", *,
                taxonomy: Taxonomy | str | None = None, images: str | Path | None = None, missing: str = "count",
                verify: str = "full", **dataset_kw) -> EmotionDataset:
    """WebEmo (Panda et al., ECCV 2018) as distributed: URL lists plus the images a user downloaded.

    `path`: the folder holding `train25.txt` / `test25.txt` (lines `<url> <label index>`) and `category.txt`
    (the label hierarchy, one `('leaf', 'parent', '+')` tuple per index), or one list file. `split` picks
    train / test when a folder holds both. `images`: the folder of downloaded images (default `<path>/images`
    if it exists, else `<path>`); an image is found, anywhere below it, by its URL's file name (what wget and
    most download scripts keep). The taxonomy picks the level: webemo25 (default) the leaf, webemo7 the parent
    from category.txt, webemo2 / binary the sign. Without category.txt the index is taken as webemo25's
    (alphabetical) label order with its parents.

    missing="count" (default): a listed image that is not in `images` (dead URLs are common; the lists date from
    2017) is left out and counted in `report.notes["not_downloaded"]`, not as a problem. missing="error": it is a
    missing_file bad sample, handled by `on_bad_sample`. The sample id is the URL's file name; the URL and the
    labels of all three levels go into metadata.
    """
    path = Path(path)
    if missing not in ("count", "error"):
        raise ValueError(f"WebEmo missing must be 'count' or 'error', got {missing!r}")
    list_file, root = _split_file(path, split, WEBEMO_SPLITS, WEBEMO_LIST, "WebEmo folder with lists", "list file")
    report = LoadReport(str(list_file), "webemo")
    handle = BadSampleHandler(on_bad_sample, report)
    if not list_file.is_file():
        raise BadSampleError(MISSING_FILE, "WebEmo list file does not exist", file=list_file)
    cat_file = root / "category.txt"
    categories = read_webemo_categories(cat_file) if cat_file.is_file() else _webemo_default_categories()
    tax = get_taxonomy(taxonomy or "webemo25")
    level = _WEBEMO_LEVELS.get(tax.name)
    if level is None:
        raise ValueError(f"WebEmo taxonomy must be one of {sorted(_WEBEMO_LEVELS)} (which level to label with), "
                         f"got {tax.name!r}")
    image_root = Path(images) if images is not None else (root / "images" if (root / "images").is_dir() else root)
    if not image_root.is_dir():
        raise BadSampleError(MISSING_FILE, "WebEmo image folder does not exist", file=image_root)
    on_disk: dict[str, Path] = {}
    for f in sorted(image_root.rglob("*")):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            on_disk.setdefault(f.name, f)
    rows: list[_Row] = []
    for ln, text in read_lines(list_file, handle):
        fields = text.split()
        if not fields:
            continue
        try:
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise BadSampleError(MALFORMED_LINE, f"expected '<url> <label index>', got {text.strip()[:80]!r}",
                                     file=list_file, line=ln)
            url, index = fields[0], int(fields[1])
            name = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
            if not 0 <= index < len(categories):
                raise BadSampleError(UNKNOWN_LABEL, f"label index {index} is not in 0..{len(categories) - 1}",
                                     file=list_file, line=ln, sample_id=name)
            image = on_disk.get(name)
            if image is None:
                if missing == "count":
                    report.notes["not_downloaded"] += 1
                    continue
                raise BadSampleError(MISSING_FILE, f"image {name} (from {url}) is not in {image_root}",
                                     file=list_file, line=ln, sample_id=name)
        except BadSampleError as err:
            handle(err)
            continue
        leaf, parent, sign = categories[index]
        rows.append(_Row(name, image, (leaf, parent, sign)[level], None,
                         {"url": url, "label_index": index, "webemo25": leaf, "webemo7": parent, "webemo2": sign},
                         ln, list_file))
    return _finish(rows, tax, report, handle, _image_check(verify, dataset_kw), dataset_kw)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face parquet (EasyR1)


PARQUET_EXTRA = "parquet"  # the pip extra that installs pyarrow: pip install 'emor3[parquet]'
# the release's coarse answer column (its config's coarse_answer_key, spelled so), and the plain spelling
COARSE_COLUMNS = ("course_grained", "coarse_grained")
_SHARD = re.compile(r"^(?P<split>[\w.-]+?)(-\d+-of-\d+)?\.parquet$")  # train-00000-of-00001.parquet, test.parquet


def _pyarrow_parquet():
    """pyarrow.parquet, or a one-line error naming the extra that installs it."""
    try:
        import pyarrow.parquet as pq  # optional: only parquet datasets need it
    except ModuleNotFoundError:
        raise ModuleNotFoundError("reading a parquet dataset needs pyarrow: "
                                  f"pip install 'emor3[{PARQUET_EXTRA}]'") from None
    return pq


def parquet_splits(path: str | Path) -> dict[str, list[Path]]:
    """{split: shard files} of a Hugging Face dataset folder as the hub writes it: `<split>-NNNNN-of-NNNNN.parquet`
    (or `<split>.parquet`) files, or `<split>/*.parquet` folders, in the folder itself or in its `data/` folder.
    Empty for anything else."""
    path = Path(path)
    if not path.is_dir():
        return {}
    out: dict[str, list[Path]] = {}
    for root in (path / "data", path):
        if not root.is_dir():
            continue
        for f in sorted(root.glob("*.parquet")):
            m = _SHARD.match(f.name)
            out.setdefault(m.group("split") if m else f.stem, []).append(f)
        for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".") and x != path / "data"):
            shards = sorted(d.glob("*.parquet"))
            if shards:
                out.setdefault(d.name, []).extend(shards)
        if out:
            return out
    return out


def split_suffix(path: str | Path, split: str | None = None) -> tuple[Path, str | None]:
    """EasyR1's `PATH@SPLIT` (as in the release's `fuyyy74/EmoSet2k@train`) -> (PATH, SPLIT) when PATH exists and
    PATH@SPLIT does not; any other path is returned as it is, with ``split``."""
    path = Path(path)
    head, at, tail = str(path).rpartition("@")
    if not at or path.exists() or not head or not Path(head).exists() or "/" in tail or "\\" in tail:
        return path, split
    if split is not None and split != tail:
        raise ValueError(f"{path}: names split {tail!r}, but split={split!r} was passed too")
    return Path(head), tail


def _parquet_row(rec: dict, shard: Path, row: int, base: Path) -> _Row:
    """One EasyR1 record (`problem`, `answer`, `images`, maybe the coarse answer) -> a row; BadSampleError names
    the shard and row."""
    def bad(problem: str, sid: Any = None) -> BadSampleError:
        return BadSampleError(MALFORMED_LINE, problem, file=shard, row=row, sample_id=sid)

    sid = rec.pop("id", None)
    sid = f"{shard.name}#{row}" if sid is None else str(sid)
    images = rec.pop("images", None)
    if images is None:
        images = rec.pop("image", None)
    if isinstance(images, (dict, str, bytes)):
        images = [images]
    if not isinstance(images, list) or len(images) != 1:
        n = len(images) if isinstance(images, list) else type(images).__name__
        raise bad(f"'images' must hold exactly one image (emor3 uses one image per prompt), got {n}", sid)
    data, name = (images[0].get("bytes"), images[0].get("path")) if isinstance(images[0], dict) else \
        (images[0], None) if isinstance(images[0], bytes) else (None, images[0])
    if data:
        image: Any = BytesImage.of(data, name if isinstance(name, str) else None, f"{shard.resolve()}#{row}")
    elif isinstance(name, str) and name:
        image = Path(name) if Path(name).is_absolute() else base / name
    else:
        raise bad("the image has neither bytes nor a path", sid)
    label = rec.pop("answer", None)
    if label is None:
        label = rec.pop("label", None)
    if isinstance(label, str):
        m = _BOXED.search(label)
        label = m.group(1) if m else label
    if not isinstance(label, str) or not label.strip():
        raise bad("missing 'answer' (the label), or it is not a string", sid)
    question = rec.pop("problem", None)
    if question is not None and not isinstance(question, str):
        raise bad(f"'problem' must be a string, got {type(question).__name__}", sid)
    question = _IMAGE_MARKER.sub(" ", question).strip() or None if question is not None else None
    metadata = {"source": f"{shard.name}#{row}"}
    if isinstance(image, BytesImage) and image.name:
        metadata["image_name"] = image.name
    for col in COARSE_COLUMNS:
        if rec.get(col) is not None:
            metadata["coarse_answer"] = rec.pop(col)
            break
    metadata.update({k: v for k, v in rec.items() if not isinstance(v, (bytes, bytearray))})
    return _Row(sid, image, label, metadata.pop("taxonomy", None), metadata, None, shard, question, row)


_ROW_REF = re.compile(r"^(?P<shard>.+\.parquet)#(?P<row>\d+)$")


def parquet_image_bytes(shard: str | Path, row: int) -> bytes:
    """The encoded image of row ``row`` (counted from 0) of a parquet shard in EasyR1's columns."""
    pq = _pyarrow_parquet()
    pf = pq.ParquetFile(shard)
    column = "images" if "images" in pf.schema_arrow.names else "image"
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < n:
            value = pf.read_row_group(g, columns=[column]).column(column)[row].as_py()
            value = value[0] if isinstance(value, list) and value else value
            data = value.get("bytes") if isinstance(value, dict) else value
            if not isinstance(data, bytes) or not data:
                raise ValueError(f"{shard}, row {row}: the image is not stored as bytes")
            return data
        row -= n
    raise ValueError(f"{shard}: no row {row}")


def open_image(ref: str | Path) -> Image.Image:
    """The image a run's records name: a file path, or `<shard>.parquet#<row>` for an image a parquet dataset
    holds as bytes (`BytesImage.origin`). OSError / ValueError when it cannot be read."""
    m = _ROW_REF.match(str(ref))
    if m:
        return Image.open(io.BytesIO(parquet_image_bytes(m["shard"], int(m["row"]))))
    return Image.open(ref)


def _bytes_check(verify: str, budget: ImageBudget) -> Callable[[_Row], None]:
    """The per-row check of an image held as bytes: decoded (verify="full"), its header read ("header") or only
    its size looked at ("exists"), and its shape checked at the pixel budget."""
    def check(r: _Row) -> None:
        if not isinstance(r.image, BytesImage):
            return
        ctx = dict(file=r.file, row=r.row, sample_id=r.id)
        if verify == "exists":
            return
        try:
            with Image.open(io.BytesIO(r.image.data)) as im:
                if verify == "full":
                    im.load()
                w, h = im.size
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt bytes
            unknown = isinstance(e, UnidentifiedImageError)
            why = "not an image format PIL knows" if unknown else f"{type(e).__name__}: {e}"
            raise BadSampleError(UNREADABLE_IMAGE, f"the image's {len(r.image.data)} bytes cannot be decoded ({why})",
                                 **ctx) from None
        if w == 0 or h == 0:
            raise BadSampleError(ZERO_SIZE_IMAGE, f"image has size {w}x{h}", **ctx)
        problem = budget.problem(w, h)
        if problem is not None:
            raise BadSampleError(IMAGE_SHAPE, problem, **ctx)
    return check


def load_parquet(path: str | Path, split: str | None = None, on_bad_sample: str = "error", *,
                 taxonomy: Taxonomy | str | None = None, verify: str = "full", **dataset_kw) -> EmotionDataset:
    """A Hugging Face dataset of parquet shards in EasyR1's columns, as the release's EmoSet2k downloads.

    `path`: the dataset folder (`parquet_splits` finds the shards; `split` picks one when there are several, or
    write `PATH@SPLIT`), or one shard file. Each row: `images`, one image as a {bytes, path} struct (the hub's
    Image feature), raw bytes or a path (relative to the dataset folder); `answer`, the label (may be wrapped in
    \\boxed{}); `problem`, the question (its `<image>` markers removed; `Sample.question`); optionally `id`,
    `taxonomy` and the release's coarse answer column (`course_grained`, as its config spells it, or
    `coarse_grained`), kept in metadata["coarse_answer"]: the release's reward never reads it. Every other column
    goes into metadata. Images are kept as encoded bytes in memory (`BytesImage`) and decoded when used. Ids: the
    `id` column, else `<shard file>#<row>`. Errors name the shard file and row. Needs pyarrow (the `parquet`
    extra)."""
    path = Path(path)
    if path.is_file():
        shards, root = [path], path.parent.parent if path.parent.name == "data" else path.parent
    else:
        splits = parquet_splits(path)
        if not splits:
            raise BadSampleError(MISSING_FILE, "no parquet shards (<split>-NNNNN-of-NNNNN.parquet) in it or in its "
                                 "data/ folder", file=path)
        if split is None and len(splits) == 1:
            split = next(iter(splits))
        if split not in splits:
            first = "train" if "train" in splits else next(iter(splits))
            raise ValueError(f"{path}: a Hugging Face dataset with splits {sorted(splits)}: "
                             + (f"it has no split {split!r}" if split is not None else "pass split=")
                             + f" (or write {path}@{first})")
        shards, root = splits[split], path
    pq = _pyarrow_parquet()
    report = LoadReport(str(path) + (f"@{split}" if split and not path.is_file() else ""), "parquet")
    handle = BadSampleHandler(on_bad_sample, report)
    rows: list[_Row] = []
    for shard in shards:
        try:
            pf = pq.ParquetFile(shard)
            columns = pf.schema_arrow.names
        except Exception as e:  # pyarrow's ArrowInvalid, OSError for a file that is not parquet
            raise BadSampleError(MALFORMED_LINE, f"not a readable parquet file ({type(e).__name__}: {e})",
                                 file=shard) from None
        need = [c for c in (("images", "image"), ("answer", "label")) if not any(x in columns for x in c)]
        if need:
            raise BadSampleError(MALFORMED_LINE, f"no {' or '.join(need[0])} column: an EasyR1 dataset has problem, "
                                 f"answer and images columns (this one has {columns})", file=shard)
        row = 0
        for batch in pf.iter_batches(batch_size=256):
            for rec in batch.to_pylist():
                try:
                    rows.append(_parquet_row(rec, shard, row, root))
                except BadSampleError as err:
                    handle(err)
                row += 1
    budget = ImageBudget.from_kw(dataset_kw)
    files, in_memory = _image_check(verify, dataset_kw), _bytes_check(verify, budget)

    def check(r: _Row) -> None:
        files(r)
        in_memory(r)
    return _finish(rows, taxonomy, report, handle, check, dataset_kw)


# ---------------------------------------------------------------------------------------------------------------
# EmoSet subset


EMOSET_PAPER_SIZES = {"train": 2100, "test": 2000}  # EMO-R3's EmoSet subset (the paper, "Data and protocol")


def _stratified_counts(counts: dict[str, int], n: int) -> dict[str, int]:
    """n split over labels in proportion to `counts` (largest remainder; equal remainders: label order)."""
    total = sum(counts.values())
    quota = {lab: n * c / total for lab, c in counts.items()}
    take = {lab: int(q) for lab, q in quota.items()}
    order = sorted(counts, key=lambda lab: (-(quota[lab] - take[lab]), list(counts).index(lab)))
    for lab in order[: n - sum(take.values())]:
        take[lab] += 1
    return take


def build_emoset_subset(root: str | Path, out_dir: str | Path, *, sizes: dict[str, int] | None = None,
                        seed: int = 0, on_bad_sample: str = "error") -> dict[str, Path]:
    """Draw a reproducible, label-stratified subset of EmoSet and write it as JSONL manifests.

    For each split in `sizes` (default: the paper's 2,100 train / 2,000 test, drawn from EmoSet's train and test
    splits), n samples are split over the labels in proportion to the split's label counts (largest remainder),
    and each label's share is the first k of its samples, ordered by image id, after a shuffle seeded with
    (seed, split, label): the same EmoSet files and seed give the same subset on any machine, whatever the
    order of the split file. The paper does not say how its subset was drawn; this is our rule.

    Writes `out_dir/<split>.jsonl` (absolute image paths, the EmoSet image id as `id`, the annotation path
    kept) and `out_dir/subset.json` (root, seed, sizes, counts per label, SHA-256 of each source split file).
    `load_dataset(out_dir, split="train")` then loads a split. Returns {split: manifest path}. Drawing only checks
    that each image file exists; `python -m emor3.data validate out_dir` decodes and checks the drawn ones.
    """
    import hashlib
    import random

    root, out_dir = Path(root), Path(out_dir)
    sizes = dict(EMOSET_PAPER_SIZES if sizes is None else sizes)
    written: dict[str, Path] = {}
    record: dict[str, Any] = {"source": str(root.resolve()), "seed": seed, "sizes": sizes, "counts": {},
                              "source_sha256": {}}
    for split, n in sizes.items():
        ds = load_emoset(root, split, on_bad_sample, annotations=False, verify="exists")
        by_label: dict[str, list[Sample]] = {lab: [] for lab in ds.taxonomy.labels}
        for s in ds:
            by_label[s.label].append(s)
        if n > len(ds):
            raise ValueError(f"{root}: EmoSet {split} has {len(ds)} usable samples, fewer than the {n} asked for")
        take = _stratified_counts({lab: len(v) for lab, v in by_label.items()}, n)
        rows = []
        for lab, samples in by_label.items():
            samples = sorted(samples, key=lambda s: s.id)
            random.Random(f"{seed}/{split}/{lab}").shuffle(samples)
            for s in sorted(samples[: take[lab]], key=lambda s: s.id):
                rows.append({"image": str(Path(s.image).resolve()), "label": s.label, "taxonomy": ds.taxonomy.name,
                             "id": s.id, "annotation_path": str(Path(s.metadata["annotation_path"]).resolve())})
        written[split] = write_manifest(out_dir / f"{split}.jsonl", rows)
        record["counts"][split] = take
        record["source_sha256"][split] = hashlib.sha256((root / f"{split}.json").read_bytes()).hexdigest()
    (out_dir / "subset.json").write_text(json.dumps(record, indent=2) + "\n")
    return written


# ---------------------------------------------------------------------------------------------------------------
# layout detection


_URL_LINE = re.compile(rb"^\S+://\S+\s+\d+\s*$")


def _is_webemo_list(path: Path) -> bool:
    """A .txt file whose first non-blank line is `<url> <label index>`."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                return bool(_URL_LINE.match(raw.strip()))
    return False


def detect_layout(path: str | Path, split: str | None = None) -> tuple[str, Path]:
    """("jsonl" | "emoset" | "emotion6" | "webemo" | "parquet" | "image-folder", the path to load) for a dataset
    path."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "parquet", path
        if path.name == "ground_truth.txt":
            return "emotion6", path
        if path.suffix.lower() == ".txt" and _is_webemo_list(path):
            return "webemo", path
        if path.suffix.lower() == ".json":
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return "jsonl", path  # the manifest loader reports the parse error with its line
            if isinstance(doc, list) and doc and isinstance(doc[0], list):
                return "emoset", path
        return "jsonl", path
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    if any((path / f"{s}.json").is_file() for s in EMOSET_SPLITS) and (path / "image").is_dir():
        return "emoset", path
    if (path / "ground_truth.txt").is_file():
        return "emotion6", path
    if any((path / WEBEMO_LIST.format(split=s)).is_file() for s in WEBEMO_SPLITS):
        return "webemo", path
    if parquet_splits(path):
        return "parquet", path
    manifests = sorted(path.glob("*.jsonl"))
    if manifests:
        if split is not None:
            return "jsonl", path / f"{split}.jsonl"
        if len(manifests) == 1:
            return "jsonl", manifests[0]
        raise ValueError(f"{path} holds several manifests {[m.name for m in manifests]}: pass split= "
                         f"(e.g. split='{manifests[0].stem}') or the manifest file")
    if split is not None and (path / split).is_dir():
        return "image-folder", path / split
    return "image-folder", path


def video_layout(root: Path) -> str | None:
    """"dfew" or "mafw" for a DFEW or MAFW root as distributed (`emor3.data.video_loaders`), else None."""
    try:
        return video_loaders.detect(root)
    except ValueError:
        return None


def load_video_dataset(root: Path, layout: str, split: str | None, on_bad_sample: str = "error", *,
                       verify: str = "full", **dataset_kw) -> EmotionDataset:
    """A DFEW or MAFW fold as clip samples: `split` is the split and the fold, `train1` ... `train5`, `test1` ...
    `test5` (`/data/DFEW@train1`). verify "full" decodes every clip once; otherwise the clips must exist."""
    m = re.fullmatch(r"(train|test)([1-5])", split or "")
    if m is None:
        raise ValueError(f"{root}: a {layout.upper()} root needs a split and fold, @train1 ... @train5 or @test1 ... "
                         f"@test5, got {split!r}")
    load, _ = video_loaders.LOADERS[layout]
    ds = load(root, int(m.group(2)), m.group(1), on_bad_sample=on_bad_sample,
              verify="full" if verify == "full" else "exists")
    return video_loaders.as_emotion_dataset(ds, **dataset_kw)


def load_dataset(path: str | Path, taxonomy: Taxonomy | str | None = None, on_bad_sample: str = "error", *,
                 split: str | None = None, verify: str = "full", **dataset_kw) -> EmotionDataset:
    """Load any supported layout (see the module docstring). dataset_kw: min_pixels, max_pixels, factor,
    cache_size, cache_dir for EmotionDataset's image budget and cache. `PATH@SPLIT` names a split (`split_suffix`)."""
    path, split = split_suffix(path, split)
    if path.is_dir() and (video := video_layout(path)) is not None:
        return load_video_dataset(path, video, split, on_bad_sample, verify=verify, **dataset_kw)
    layout, target = detect_layout(path, split)
    if layout == "parquet":
        return load_parquet(target, split, on_bad_sample, taxonomy=taxonomy, verify=verify, **dataset_kw)
    if layout == "emoset":
        return load_emoset(target, split, on_bad_sample, taxonomy=taxonomy, verify=verify, **dataset_kw)
    if layout == "emotion6":
        return load_emotion6(target, on_bad_sample, taxonomy=taxonomy, verify=verify, **dataset_kw)
    if layout == "webemo":
        return load_webemo(target, split, on_bad_sample, taxonomy=taxonomy, verify=verify, **dataset_kw)
    if layout == "jsonl":
        return load_manifest(target, taxonomy, on_bad_sample, verify=verify, **dataset_kw)
    return load_image_folder(target, taxonomy, on_bad_sample, verify=verify, **dataset_kw)


def holds_clips(path: str | Path) -> bool | None:
    """Whether the dataset at `path` (`PATH@SPLIT` as `load_dataset` takes it) is made of clips: a DFEW or MAFW
    root, or a manifest whose first row names a clip (`frames` / `video`); None when it does not exist here."""
    path, split = split_suffix(path)
    if not path.exists():
        return None
    if path.is_dir() and video_layout(path) is not None:
        return True
    try:
        layout, target = detect_layout(path, split)
    except (ValueError, FileNotFoundError):
        return False
    if layout != "jsonl" or target.suffix.lower() != ".jsonl" or not target.is_file():
        return False
    with open(target, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and ("frames" in row or "video" in row) and "image" not in row
    return False


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL atomically (``write_atomic``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def label_histogram(samples) -> Counter:
    return Counter(s.label for s in samples)
