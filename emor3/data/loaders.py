"""Dataset loaders: JSONL manifests (ours and EasyR1 rows), image-folder trees, EmoSet's published layout.

`load_dataset(path, taxonomy=None, on_bad_sample="error")` detects the layout:
- a `.jsonl` file (or a `.json` file holding a list of objects): a manifest, one JSON object per line:
    {"image": "images/0001.png", "label": "awe", "taxonomy": "mikels8", "id": "0001", ...}
  `image` is relative to the manifest's folder (absolute paths are kept); `taxonomy` and `id` are optional; every
  other key goes into the sample's metadata (EmoScenes keeps its ground-truth `cues` and cold-start `response`
  there). EasyR1-style rows are accepted too: {"images": ["a.jpg"], "problem": "...", "answer": "awe"} (one image
  per row; `answer` may be wrapped in \\boxed{}; `problem` is kept in metadata).
- a folder with `train.json` / `val.json` / `test.json` next to `image/` and `annotation/` folders, or one of those
  split files itself: EmoSet (Yang et al., ICCV 2023, github.com/JingyuanYY/EmoSet README): each split file is a
  JSON list of `[emotion, image_id, image_path, annotation_path]` (paths relative to the root); the 3-element
  `[emotion, image_path, annotation_path]` rows some copies use are accepted too. The annotation JSON (brightness,
  colorfulness, scene, object, facial_expression, human_action) goes into metadata["annotation"]. Taxonomy mikels8.
- any other folder: an image-folder tree `root/<label>/<file>` (Emotion6, FI, ArtPhoto ship this way); files in
  nested folders below a label folder count for that label.
A folder holding several manifests (e.g. written by `python -m emor3.data emoscenes`) or EmoSet needs `split=`.

Ids are stable across runs: the row's `id` if given, else the image path relative to the dataset root.
Without a taxonomy (argument or per-row field) the built-in one that recognises the most labels is used; a tie
is an error asking for `taxonomy=`. A per-row `taxonomy` field wins over the argument, which is the default for
rows without one.

Checked per sample (reasons in emor3.data.dataset.REASONS): missing file, unreadable or truncated image (verify=
"full", the default, decodes each image once at load time and drops the pixels; "header" only opens it),
zero-size image, unknown label, malformed JSON line or row, duplicate id; and an empty result.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from emor3.data.dataset import (
    DUPLICATE_ID, MALFORMED_LINE, MISSING_FILE, UNKNOWN_LABEL, UNREADABLE_IMAGE, BadSampleError,
    BadSampleHandler, EmotionDataset, ImageBudget, LoadReport, Sample, check_image_file,
)
from emor3.data.taxonomy import BUILTIN_NAMES, Taxonomy, get_taxonomy

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_JUNK = {"thumbs.db", "desktop.ini"}
EMOSET_SPLITS = ("train", "val", "test")
_BOXED = re.compile(r"\\boxed\{(.*)\}", re.S)
_IMAGE_MARKER = re.compile(r"[ \t]*<image>[ \t]*")  # EasyR1's image placeholder inside `problem`


class _Row:
    """A parsed row before its taxonomy and label are resolved."""

    __slots__ = ("id", "image", "label", "taxonomy", "metadata", "line", "file", "question")

    def __init__(self, id, image, label, taxonomy, metadata, line, file, question=None):
        self.id, self.image, self.label, self.taxonomy = id, image, label, taxonomy
        self.metadata, self.line, self.file, self.question = metadata, line, file, question


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
                                     line=r.line, sample_id=r.id) from None
            canon = tax.canonical(r.label)
            if canon is None:
                raise BadSampleError(UNKNOWN_LABEL, f"label {r.label!r} is not in taxonomy {tax.name!r} "
                                     f"{list(tax.labels)}", file=r.file, line=r.line, sample_id=r.id)
            if r.id in seen:
                raise BadSampleError(DUPLICATE_ID, f"id {r.id!r} was already used at {seen[r.id]}", file=r.file,
                                     line=r.line, sample_id=r.id)
            check(r)
        except BadSampleError as err:
            handle(err)
            continue
        seen[r.id] = f"line {r.line}" if r.line is not None else str(r.image)
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
        if isinstance(r.image, Path):
            check_image_file(r.image, verify=verify, file=r.file, line=r.line, sample_id=r.id, budget=budget)
    return check


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
    else:
        image = obj.pop("image", None)
        label = obj.pop("label", None)
        question = obj.pop("question", None)
    if question is not None:
        if not isinstance(question, str):
            raise bad(f"'question' / 'problem' must be a string, got {type(question).__name__}", sid)
        question = _IMAGE_MARKER.sub(" ", question).strip() or None
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


def load_emoset(path: str | Path, split: str | None = None, on_bad_sample: str = "error", *,
                taxonomy: Taxonomy | str | None = None, annotations: bool = True, verify: str = "full",
                **dataset_kw) -> EmotionDataset:
    """EmoSet: `path` is the root (then `split` picks train/val/test) or a split file itself."""
    path = Path(path)
    if path.is_dir():
        if split is None:
            present = [s for s in EMOSET_SPLITS if (path / f"{s}.json").is_file()]
            if len(present) != 1:
                raise ValueError(f"{path}: EmoSet root with splits {present}: pass split= (or the split file)")
            split = present[0]
        split_file, root = path / f"{split}.json", path
    else:
        split_file, root = path, path.parent
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
# layout detection


def detect_layout(path: str | Path, split: str | None = None) -> tuple[str, Path]:
    """("jsonl" | "emoset" | "image-folder", the path to load) for a dataset path."""
    path = Path(path)
    if path.is_file():
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


def load_dataset(path: str | Path, taxonomy: Taxonomy | str | None = None, on_bad_sample: str = "error", *,
                 split: str | None = None, verify: str = "full", **dataset_kw) -> EmotionDataset:
    """Load any supported layout (see the module docstring). dataset_kw: min_pixels, max_pixels, factor,
    cache_size, cache_dir for EmotionDataset's image budget and cache."""
    layout, target = detect_layout(path, split)
    if layout == "emoset":
        return load_emoset(target, split, on_bad_sample, taxonomy=taxonomy, verify=verify, **dataset_kw)
    if layout == "jsonl":
        return load_manifest(target, taxonomy, on_bad_sample, verify=verify, **dataset_kw)
    return load_image_folder(target, taxonomy, on_bad_sample, verify=verify, **dataset_kw)


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL atomically (a temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def label_histogram(samples) -> Counter:
    return Counter(s.label for s in samples)
