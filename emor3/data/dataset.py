"""Samples, datasets, bad-input reporting and image loading with a pixel budget.

A `Sample` is one (image, canonical label, taxonomy, stable id, metadata) record. Its image is a path or an
`ImageSource` (anything with `.key` and `.open() -> PIL.Image`, e.g. an EmoScenes scene drawn on demand, or a
parquet dataset's encoded bytes, `BytesImage`); nothing is decoded when a dataset is built.

`EmotionDataset.image(i)` decodes sample i lazily, converts to RGB and resizes it once to the processor's pixel
budget with Qwen2-VL's `smart_resize` rule (sides multiples of `factor` = patch 14 x merge 2 = 28, area within
[min_pixels, max_pixels], aspect kept), and caches the result in memory (an LRU of `cache_size` images) and, if
`cache_dir` is given, on disk as PNG; later epochs reuse it. Because the image already has the size the Qwen
processor would pick, the processor's own resize is then the identity.

`to_rgb` is the one conversion to 8-bit RGB: 16-bit and 32-bit grey images (PIL modes I;16*, I, F) are scaled to
8 bits instead of being clipped, as a plain `convert("RGB")` does (it maps every 16-bit value above 255 to white).

`image_shape_problem` states what Qwen-VL's image processor can take: an aspect ratio of at most 200:1 (its
`smart_resize` raises beyond), and, at the pixel budget, a short side of at least one `factor`-pixel block (below it
the processor stretches the image past `max_pixels`). Loaders check it for every image whose size they read, with
the budget passed to them (`min_pixels`, `max_pixels`, `factor`; Qwen2.5-VL's defaults when not given), so such an
image is a bad sample like a corrupt one, not a crash at the first training step.

Bad input never passes silently: loaders raise `BadSampleError` naming the file, the line or sample id and the
problem, or, with `on_bad_sample="skip"`, record it in the dataset's `LoadReport` (counts per reason plus the first
few messages), which the train loop prints at start. An empty dataset is always an error.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from emor3.config import OnBadSample, choices
from emor3.data.clip_source import is_clip_source
from emor3.data.taxonomy import Taxonomy, get_taxonomy

# reasons a sample is bad; the keys of LoadReport.skipped
MISSING_FILE = "missing_file"
UNREADABLE_IMAGE = "unreadable_image"
ZERO_SIZE_IMAGE = "zero_size_image"
UNKNOWN_LABEL = "unknown_label"
MALFORMED_LINE = "malformed_line"
DUPLICATE_ID = "duplicate_id"
EMPTY_DATASET = "empty_dataset"
IMAGE_SHAPE = "bad_image_shape"
PROMPT_TOO_LONG = "prompt_too_long"  # over --data.max-prompt-length with its image tokens (found when prompts are built)
REASONS = (MISSING_FILE, UNREADABLE_IMAGE, ZERO_SIZE_IMAGE, UNKNOWN_LABEL, MALFORMED_LINE, DUPLICATE_ID,
           EMPTY_DATASET, IMAGE_SHAPE, PROMPT_TOO_LONG)
ON_BAD_SAMPLE = choices(OnBadSample)

# Qwen2-VL / Qwen2.5-VL image processor defaults (transformers' qwen2_vl `smart_resize`): patch 14 x merge 2
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
QWEN_MAX_ASPECT = 200


def write_atomic(path: str | Path, write) -> Path:
    """``write(file)`` into a temporary file of this process (binary), then rename it to ``path``: a reader, or
    another process writing the same bytes (two runs of one seed sharing a cache folder), never sees a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    tmp.replace(path)
    return path


class BadSampleError(ValueError):
    """A bad sample: `file`, `line` (1-based, None if not line-based), `sample_id`, `reason` (one of REASONS)."""

    def __init__(self, reason: str, problem: str, *, file: str | Path | None = None, line: int | None = None,
                 sample_id: str | None = None, row: int | None = None):
        assert reason in REASONS, reason
        self.reason, self.problem, self.file, self.line, self.sample_id = reason, problem, file, line, sample_id
        self.row = row  # a table's row (a parquet shard's, counted from 0 as pyarrow and pandas do), or None
        where = str(file) if file is not None else "<dataset>"
        if line is not None:
            where += f":{line}"
        if row is not None:
            where += f", row {row}"
        if sample_id is not None:
            where += f": sample {sample_id!r}"
        super().__init__(f"{where}: {problem} [{reason}]")


@dataclass
class LoadReport:
    """What a loader did: where from, which layout, how many samples kept, what was skipped and why.

    `notes` counts what a layout expects and is not a problem (WebEmo images never downloaded, Emotion6 labels
    taken from the folder because every emotion probability is 0); they are printed, but `ok` ignores them."""

    source: str
    layout: str
    taxonomy: str | None = None
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first few messages
    max_examples: int = 5
    notes: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.skipped

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, err: BadSampleError) -> None:
        self.skipped[err.reason] += 1
        ex = self.examples.setdefault(err.reason, [])
        if len(ex) < self.max_examples:
            ex.append(str(err))

    def merge(self, other: "LoadReport") -> None:
        self.loaded += other.loaded
        self.notes.update(other.notes)
        for reason, n in other.skipped.items():
            self.skipped[reason] += n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: self.max_examples - len(ex)])

    def summary(self) -> str:
        """One line, then one line per skip reason with its first message; printed by the train loop at start."""
        head = f"{self.source}: {self.loaded} samples ({self.layout} layout, taxonomy {self.taxonomy})"
        if self.notes:
            head += " [" + ", ".join(f"{k}={n}" for k, n in sorted(self.notes.items())) + "]"
        if not self.skipped:
            return head + ", nothing skipped"
        counts = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        lines = [head + f", SKIPPED {self.n_skipped} bad samples: {counts}"]
        for reason in sorted(self.examples):
            lines += [f"  e.g. {m}" for m in self.examples[reason][:2]]
        return "\n".join(lines)

    __str__ = summary


class BadSampleHandler:
    """Applies the on_bad_sample policy: raise (error) or count into a LoadReport (skip)."""

    def __init__(self, on_bad_sample: str, report: LoadReport):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.mode, self.report = on_bad_sample, report

    def __call__(self, err: BadSampleError) -> None:
        if self.mode == "error":
            raise err
        self.report.add(err)


@runtime_checkable
class ImageSource(Protocol):
    """An image that is not a file: `key` identifies it (for caching), `open()` makes it."""

    key: str

    def open(self) -> Image.Image: ...


@dataclass(frozen=True, repr=False)
class BytesImage:
    """An encoded image held in memory (a parquet dataset's `images` column): `key` names it for the caches (a
    digest of the bytes), `name` is the file name the dataset recorded, if any, and `origin` where the bytes are
    stored (`<shard>.parquet#<row>`, what a run's samples.jsonl records; `emor3.data.open_image` reads it back)."""

    data: bytes
    key: str
    name: str | None = None
    origin: str | None = None

    @classmethod
    def of(cls, data: bytes, name: str | None = None, origin: str | None = None) -> "BytesImage":
        return cls(data, "bytes:" + hashlib.sha1(data).hexdigest(), name, origin)

    def open(self) -> Image.Image:
        im = Image.open(io.BytesIO(self.data))
        im.load()  # decoded now: the bytes object is the only source, nothing to keep open
        return im

    def __repr__(self) -> str:
        return f"BytesImage({self.name or self.key}, {len(self.data)} bytes)"


@dataclass
class Sample:
    """One example. image: a file path or an ImageSource. label: canonical label of `taxonomy` (a name).

    question: the user's own question text for this image (a manifest's `question`, an EasyR1 row's `problem`
    with its `<image>` markers removed), or None for the default question that lists the taxonomy's labels. A
    prompt builder that honours it sends `question`, then the SET instruction, instead of the default question.
    """

    id: str
    image: Path | ImageSource
    label: str
    taxonomy: str
    metadata: dict = field(default_factory=dict)
    question: str | None = None

    @property
    def is_clip(self) -> bool:
        """Whether the sample is a clip (its `image` a clip source, `emor3.data.clip_source`)."""
        return is_clip_source(self.image)

    def open_image(self) -> Image.Image:
        """The full-size image, decoded now, RGB. Errors name the file and sample id."""
        if self.is_clip:
            raise TypeError(f"sample {self.id!r} is a clip: read it with EmotionDataset.image or "
                            "sample.image.open_clip()")
        if isinstance(self.image, (str, Path)):
            return decode_image(Path(self.image), sample_id=self.id)
        return to_rgb(self.image.open())


def _grey_to_8bit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255, rounding to nearest; values outside are clipped."""
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(values.shape)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. Grey images deeper than 8 bits are scaled, never clipped:
    - I;16 (and I;16L/B/N, what Pillow opens 16-bit PNG and TIFF as): v -> round(v / 257), so 0..65535 -> 0..255;
    - I (32-bit int): as 8-bit when every value is in 0..255, as 16-bit (v / 257) when in 0..65535, otherwise its
      own min..max stretched to 0..255;
    - F (float): x 255 when every value is in [0, 1], as 8-bit when in 0..255, otherwise min..max stretched.
    Every other mode goes through PIL's `convert("RGB")` (palette, grey, CMYK, alpha dropped)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im.convert("F") if im.mode == "F" else im.convert("I"))  # (H, W) float32 or int32
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        elif lo >= 0 and hi <= 255:
            lo, hi = 0.0, 255.0
        elif im.mode == "I" and lo >= 0 and hi <= 65535:
            lo, hi = 0.0, 65535.0
        return Image.fromarray(_grey_to_8bit(a, lo, hi), mode="L").convert("RGB")
    return im.convert("RGB")


def decode_image(path: Path, *, sample_id: str | None = None, line: int | None = None,
                 file: str | Path | None = None) -> Image.Image:
    """Fully decode an image file to RGB, turning every failure into a BadSampleError that names it."""
    ctx = dict(file=file if file is not None else path, line=line, sample_id=sample_id)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadSampleError(MISSING_FILE, f"image file {path} does not exist", **ctx) from None
    except OSError as e:
        raise BadSampleError(UNREADABLE_IMAGE, f"image file {path} cannot be read: {e}", **ctx) from None
    if size == 0:
        raise BadSampleError(ZERO_SIZE_IMAGE, f"image file {path} is empty (0 bytes)", **ctx)
    try:
        with Image.open(path) as im:
            im.load()  # full decode: a truncated file fails here, not later in training
            if im.width == 0 or im.height == 0:
                raise BadSampleError(ZERO_SIZE_IMAGE, f"image {path} has size {im.width}x{im.height}", **ctx)
            return to_rgb(im)
    except BadSampleError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        raise BadSampleError(UNREADABLE_IMAGE, f"image {path} cannot be decoded ({type(e).__name__}: {e})",
                             **ctx) from None


def smart_resize(height: int, width: int, *, factor: int = QWEN_FACTOR, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's resize rule, as transformers' `qwen2_vl` image processor computes it: sides rounded to multiples
    of `factor`, area scaled into [min_pixels, max_pixels], aspect ratio kept (at most 200:1, else ValueError)."""
    if max(height, width) / max(1, min(height, width)) > QWEN_MAX_ASPECT:
        raise ValueError(f"image aspect ratio {height}x{width} exceeds {QWEN_MAX_ASPECT}, which Qwen2-VL rejects")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:  # also a side that rounds to 0: scaled up until the area reaches min_pixels
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def image_shape_problem(width: int, height: int, *, factor: int | None = None, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> str | None:
    """Why Qwen-VL's image processor cannot take a `width` x `height` image at this pixel budget, or None.

    Two rules (None for a setting = Qwen2.5-VL's default): the aspect ratio is at most 200:1 (`smart_resize`
    raises beyond), and the short side, scaled to `max_pixels`, keeps at least one `factor`-pixel block (patch
    14 x merge 2): below that `smart_resize` clamps it to `factor` and the image gets more pixels, so more image
    tokens, than `max_pixels` allows. A zero side is ZERO_SIZE_IMAGE's business and returns None here.
    """
    factor = factor or QWEN_FACTOR
    min_pixels = min_pixels or QWEN_MIN_PIXELS
    max_pixels = max_pixels or QWEN_MAX_PIXELS
    short, long_ = min(width, height), max(width, height)
    if short == 0:
        return None
    if long_ / short > QWEN_MAX_ASPECT:
        return (f"image is {width}x{height}, aspect ratio {long_ / short:.0f}:1, over the {QWEN_MAX_ASPECT}:1 "
                "that Qwen-VL's image processor accepts; crop or pad it")
    if round(height / factor) * round(width / factor) * factor * factor > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        if math.floor(short / beta / factor) == 0:
            h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            return (f"image is {width}x{height}: at max_pixels={max_pixels} its short side would be "
                    f"{short / beta:.1f} px, under one {factor}-px block, so the processor would stretch it to "
                    f"{w}x{h} = {w * h} pixels, over max_pixels; crop it or raise max_pixels")
    return None


class EmotionDataset(Sequence[Sample]):
    """A list of samples, their taxonomy, the load report, and budgeted cached image access."""

    def __init__(self, samples: list[Sample], taxonomy: Taxonomy | str | None, report: LoadReport, *,
                 min_pixels: int | None = None, max_pixels: int | None = None, factor: int = 28,
                 cache_size: int = 100_000, cache_dir: str | Path | None = None):
        self.samples = list(samples)
        self.taxonomy = get_taxonomy(taxonomy) if taxonomy is not None else None
        self.report = report
        self.report.loaded = len(self.samples)
        if not self.samples:
            raise BadSampleError(EMPTY_DATASET, "no usable samples" + (
                f" (skipped: {dict(report.skipped)})" if report.skipped else ""), file=report.source)
        self._by_id = {s.id: i for i, s in enumerate(self.samples)}
        self.set_image_budget(min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)
        self.cache_size = cache_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()

    def set_image_budget(self, *, min_pixels: int | None, max_pixels: int | None, factor: int = 28) -> None:
        """Set the pixel budget images are resized to (None, None: keep original size). Clears the cache."""
        self.min_pixels, self.max_pixels, self.factor = min_pixels, max_pixels, factor
        self._cache = OrderedDict()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.samples[i]
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def by_id(self, sample_id: str) -> Sample:
        return self.samples[self._by_id[sample_id]]

    def label_counts(self) -> dict[str, int]:
        """Count per label, in taxonomy order where there is one taxonomy."""
        c = Counter(s.label for s in self.samples)
        order = list(self.taxonomy.labels) if self.taxonomy is not None else sorted(c)
        return {lab: c.get(lab, 0) for lab in order} | {lab: n for lab, n in c.items() if lab not in order}

    def _cache_key(self, s: Sample) -> str:
        src = str(Path(s.image).resolve()) if isinstance(s.image, (str, Path)) else s.image.key
        return f"{src}|{self.min_pixels}|{self.max_pixels}|{self.factor}"

    def image(self, i: int) -> Image.Image:
        """Sample i's image, RGB, resized to the pixel budget; decoded and resized once, then cached. A clip
        sample's is its `Clip` (every frame at full size: the processor samples and resizes clips at the run's
        video settings), decoded on every call and not cached: a dataset of clips held decoded would not fit in
        memory (DFEW's 16k clips of ~100 frames), and one decode per use is small beside a rollout."""
        s = self.samples[i]
        key = self._cache_key(s)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if s.is_clip:
            try:
                clip = s.image.open_clip()
            except (ValueError, OSError) as e:
                raise BadSampleError(UNREADABLE_IMAGE, f"the clip does not decode ({e})", file=self.report.source,
                                     sample_id=s.id) from None
            return clip
        disk = None
        if self.cache_dir is not None:
            disk = self.cache_dir / (hashlib.sha1(key.encode()).hexdigest() + ".png")
            if disk.is_file():
                with Image.open(disk) as im:
                    img = im.convert("RGB")
                self._remember(key, img)
                return img
        img = s.open_image()
        if self.max_pixels is not None or self.min_pixels is not None:
            problem = image_shape_problem(img.width, img.height, factor=self.factor, min_pixels=self.min_pixels,
                                          max_pixels=self.max_pixels or 1 << 62)
            if problem is not None:  # a loader that could not see the size (verify="exists", an ImageSource)
                raise BadSampleError(IMAGE_SHAPE, problem, file=self.report.source, sample_id=s.id)
            h, w = smart_resize(img.height, img.width, factor=self.factor,
                                min_pixels=self.min_pixels or self.factor ** 2,
                                max_pixels=self.max_pixels or 1 << 62)
            if (h, w) != (img.height, img.width):
                img = img.resize((w, h), Image.Resampling.BICUBIC)
        if disk is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(".tmp.png")
            img.save(tmp)
            tmp.replace(disk)  # atomic: a crash never leaves half an image in the cache
        self._remember(key, img)
        return img

    def _remember(self, key: str, img: Image.Image) -> None:
        self._cache[key] = img
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def subset(self, indices: Sequence[int]) -> "EmotionDataset":
        rep = LoadReport(self.report.source, self.report.layout, self.report.taxonomy)
        return EmotionDataset([self.samples[i] for i in indices], self.taxonomy, rep, min_pixels=self.min_pixels,
                              max_pixels=self.max_pixels, factor=self.factor, cache_size=self.cache_size,
                              cache_dir=self.cache_dir)

    def __repr__(self) -> str:
        tax = self.taxonomy.name if self.taxonomy is not None else "mixed"
        return f"EmotionDataset({len(self)} samples, taxonomy={tax}, source={self.report.source!r})"


@dataclass(frozen=True)
class ImageBudget:
    """The image processor's limits that `image_shape_problem` checks against (None: Qwen2.5-VL's default)."""

    factor: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    @classmethod
    def from_kw(cls, kw: dict) -> "ImageBudget":
        """The budget a loader's EmotionDataset keywords (min_pixels, max_pixels, factor) describe."""
        return cls(kw.get("factor"), kw.get("min_pixels"), kw.get("max_pixels"))

    def problem(self, width: int, height: int) -> str | None:
        return image_shape_problem(width, height, factor=self.factor, min_pixels=self.min_pixels,
                                   max_pixels=self.max_pixels)


def check_image_file(path: Path, *, verify: str, file: Any, line: int | None, sample_id: str | None,
                     budget: ImageBudget | None = None) -> None:
    """Raise BadSampleError if the image is missing, empty, (verify="full": fully decoded) corrupt, or has a shape
    the image processor cannot take at `budget` (`image_shape_problem`; Qwen2.5-VL's defaults when None).

    verify: "full" decodes the whole image (catches truncation; one decode per image at load time, pixels dropped),
    "header" reads only the header (size, format), "exists" only checks the file is there and non-empty (and so
    cannot check the shape).
    """
    ctx = dict(file=file, line=line, sample_id=sample_id)
    budget = budget or ImageBudget()
    if verify == "full":
        w, h = decode_image(path, **ctx).size
    else:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BadSampleError(MISSING_FILE, f"image file {path} does not exist", **ctx) from None
        if size == 0:
            raise BadSampleError(ZERO_SIZE_IMAGE, f"image file {path} is empty (0 bytes)", **ctx)
        if verify == "exists":
            return
        if verify != "header":
            raise ValueError(f"verify must be 'full', 'header' or 'exists', got {verify!r}")
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:
            raise BadSampleError(UNREADABLE_IMAGE, f"image {path} cannot be opened ({type(e).__name__}: {e})",
                                 **ctx) from None
        if w == 0 or h == 0:
            raise BadSampleError(ZERO_SIZE_IMAGE, f"image {path} has size {w}x{h}", **ctx)
    problem = budget.problem(w, h)
    if problem is not None:
        raise BadSampleError(IMAGE_SHAPE, f"{path}: {problem}", **ctx)
