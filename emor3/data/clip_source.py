"""Clips as dataset samples: a `Sample` whose `image` is a clip source is a clip sample.

A clip source is anything with `key` (what caches and records name it by) and `open_clip() -> Clip` (all frames,
decoded now): `ClipFiles`, a manifest row's clip (a list of frame files, a folder of frames, an animated GIF / WebP or
a video file, with its frame rate), or a clip drawn on demand (`emor3.toy.emoscenes_clips.SceneClip`).
`EmotionDataset.image(i)` returns a clip sample's `Clip` (the processor samples, resizes and patches it at the
run's video settings), and `emor3.engine.prompts` puts a video part in its SET prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from emor3.models.clips import FRAME_SUFFIXES, Clip, read_clip


@runtime_checkable
class ClipSource(Protocol):
    """A clip that a sample refers to: `key` identifies it, `open_clip()` decodes it."""

    key: str

    def open_clip(self) -> Clip: ...


def is_clip_source(x: Any) -> bool:
    return callable(getattr(x, "open_clip", None)) and hasattr(x, "key")


@dataclass(frozen=True)
class ClipFiles:
    """A clip on disk: `frames` (frame files in order) or `path` (a folder of frames, a GIF / WebP, a video file),
    and its frame rate (None: the file's own; a folder or frame list has none)."""

    frames: tuple[Path, ...] = ()
    path: Path | None = None
    fps: float | None = None

    def __post_init__(self):
        if bool(self.frames) == (self.path is not None):
            raise ValueError("ClipFiles: give either frame files or one clip path")

    @property
    def key(self) -> str:
        src = ",".join(str(p.resolve()) for p in self.frames) if self.frames else str(self.path.resolve())
        return f"clip:{src}@{self.fps}"

    @property
    def origin(self) -> str:
        """What a run's samples.jsonl records: the clip path, or the folder of the first frame and the count."""
        if self.path is not None:
            return str(self.path.resolve())
        return f"{self.frames[0].resolve().parent}/[{len(self.frames)} frames]"

    def missing(self) -> list[Path]:
        """The files this clip needs that do not exist."""
        if self.path is not None:
            return [] if self.path.exists() else [self.path]
        return [p for p in dict.fromkeys(self.frames) if not p.is_file()]

    def open_clip(self) -> Clip:
        return read_clip(list(self.frames) if self.frames else self.path, fps=self.fps)

    def probe(self) -> tuple[int, float | None, int, int] | None:
        """(frames, fps, height, width) read from file names and the first frame's header, without decoding; None
        for a GIF / WebP or video file (decode it to know)."""
        frames = list(self.frames)
        if self.path is not None and self.path.is_dir():
            frames = [p for p in self.path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES]
        if not frames:
            return None
        with Image.open(frames[0]) as im:
            w, h = im.size
        return len(frames), self.fps, h, w
