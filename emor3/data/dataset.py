"""Samples, datasets, bad-input reporting and image loading with a pixel budget.

A `Sample` is one (image, canonical label, taxonomy, stable id, metadata) record. Its image is a path or an
`ImageSource` (anything with `.key` and `.open() -> PIL.Image`, e.g. an EmoScenes scene drawn on demand); nothing is
decoded when a dataset is built.

`EmotionDataset.image(i)` decodes sample i lazily, converts to RGB and resizes it once to the processor's pixel
budget with Qwen2-VL's `smart_resize` rule (sides multiples of `factor` = patch 14 x merge 2 = 28, area within
[min_pixels, max_pixels], aspect kept), and caches the result in memory (an LRU of `cache_size` images) and, if
`cache_dir` is given, on disk as PNG; later epochs reuse it. Because the image already has the size the Qwen
processor would pick, the processor's own resize is then the identity.

Bad input never passes silently: loaders raise `BadSampleError` naming the file, the line or sample id and the
problem, or, with `on_bad_sample="skip"`, record it in the dataset's `LoadReport` (counts per reason plus the first
few messages), which the train loop prints at start. An empty dataset is always an error.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from PIL import Image

from emor3.data.taxonomy import Taxonomy, get_taxonomy

# reasons a sample is bad; the keys of LoadReport.skipped
MISSING_FILE = "missing_file"
UNREADABLE_IMAGE = "unreadable_image"
ZERO_SIZE_IMAGE = "zero_size_image"
UNKNOWN_LABEL = "unknown_label"
MALFORMED_LINE = "malformed_line"
DUPLICATE_ID = "duplicate_id"
EMPTY_DATASET = "empty_dataset"
REASONS = (MISSING_FILE, UNREADABLE_IMAGE, ZERO_SIZE_IMAGE, UNKNOWN_LABEL, MALFORMED_LINE, DUPLICATE_ID,
           EMPTY_DATASET)
ON_BAD_SAMPLE = ("error", "skip")


class BadSampleError(ValueError):
    """A bad sample: `file`, `line` (1-based, None if not line-based), `sample_id`, `reason` (one of REASONS)."""

    def __init__(self, reason: str, problem: str, *, file: str | Path | None = None, line: int | None = None,
                 sample_id: str | None = None):
        assert reason in REASONS, reason
        self.reason, self.problem, self.file, self.line, self.sample_id = reason, problem, file, line, sample_id
        where = str(file) if file is not None else "<dataset>"
        if line is not None:
            where += f":{line}"
        if sample_id is not None:
            where += f": sample {sample_id!r}"
        super().__init__(f"{where}: {problem} [{reason}]")


@dataclass
class LoadReport:
    """What a loader did: where from, which layout, how many samples kept, what was skipped and why."""

    source: str
    layout: str
    taxonomy: str | None = None
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first few messages
    max_examples: int = 5

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
        for reason, n in other.skipped.items():
            self.skipped[reason] += n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: self.max_examples - len(ex)])

    def summary(self) -> str:
        """One line, then one line per skip reason with its first message; printed by the train loop at start."""
        head = f"{self.source}: {self.loaded} samples ({self.layout} layout, taxonomy {self.taxonomy})"
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


@dataclass
class Sample:
    """One example. image: a file path or an ImageSource. label: canonical label of `taxonomy` (a name)."""

    id: str
    image: Path | ImageSource
    label: str
    taxonomy: str
    metadata: dict = field(default_factory=dict)

    def open_image(self) -> Image.Image:
        """The full-size image, decoded now, RGB. Errors name the file and sample id."""
        if isinstance(self.image, (str, Path)):
            return decode_image(Path(self.image), sample_id=self.id)
        return self.image.open().convert("RGB")


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
            return im.convert("RGB")
    except BadSampleError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        raise BadSampleError(UNREADABLE_IMAGE, f"image {path} cannot be decoded ({type(e).__name__}: {e})",
                             **ctx) from None


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's resize rule (transformers' `qwen2_vl` image processor): sides rounded to multiples of `factor`,
    area scaled into [min_pixels, max_pixels], aspect ratio kept (at most 200:1)."""
    if max(height, width) / max(1, min(height, width)) > 200:
        raise ValueError(f"image aspect ratio {height}x{width} exceeds 200, which Qwen2-VL rejects")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


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
        """Sample i's image, RGB, resized to the pixel budget; decoded and resized once, then cached."""
        s = self.samples[i]
        key = self._cache_key(s)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
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


def check_image_file(path: Path, *, verify: str, file: Any, line: int | None, sample_id: str | None) -> None:
    """Raise BadSampleError if the image is missing, empty or (verify="full": fully decoded) corrupt.

    verify: "full" decodes the whole image (catches truncation; one decode per image at load time, pixels dropped),
    "header" reads only the header (size, format), "exists" only checks the file is there and non-empty.
    """
    ctx = dict(file=file, line=line, sample_id=sample_id)
    if verify == "full":
        decode_image(path, **ctx)
        return
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadSampleError(MISSING_FILE, f"image file {path} does not exist", **ctx) from None
    if size == 0:
        raise BadSampleError(ZERO_SIZE_IMAGE, f"image file {path} is empty (0 bytes)", **ctx)
    if verify == "header":
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:
            raise BadSampleError(UNREADABLE_IMAGE, f"image {path} cannot be opened ({type(e).__name__}: {e})",
                                 **ctx) from None
        if w == 0 or h == 0:
            raise BadSampleError(ZERO_SIZE_IMAGE, f"image {path} has size {w}x{h}", **ctx)
    elif verify != "exists":
        raise ValueError(f"verify must be 'full', 'header' or 'exists', got {verify!r}")
