"""Clips as decoded frames: `Clip` and `read_clip`, the one place a clip file or folder is read.

Inputs: a folder of frames (sorted by name, numbers compared as numbers), a list of frame paths (a manifest row's
frames), an animated GIF or WebP (Pillow; fps from the frame durations), or a video file through PyAV (the optional
`video` extra, `pip install 'emor3[video]'`; an error names it when missing). A folder or list has no frame rate of
its own: pass `fps=`. Every frame is decoded to (3, H, W) uint8 RGB; the frames of a clip must share one size.
Sampling, resizing and patching for the model are `emor3.models.video`'s.

Shape legend: F frames, H x W frame size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ANIMATED_SUFFIXES = (".gif", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpeg", ".mpg")


@dataclass
class Clip:
    """Decoded frames of one clip and the rate they were decoded at."""

    frames: Tensor  # (F, C, H, W) uint8
    fps: float | None  # frames per second of `frames`; None when unknown (a folder without fps=)
    source: str = "<frames>"  # what errors name

    def __post_init__(self):
        if self.frames.dim() != 4 or self.frames.dtype != torch.uint8 or self.frames.shape[1] != 3:
            raise ValueError(f"{self.source}: frames must be (F, 3, H, W) uint8, got {tuple(self.frames.shape)} "
                             f"{self.frames.dtype}")
        if self.frames.shape[0] == 0:
            raise ValueError(f"{self.source}: the clip has no frames")

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


def _natural_key(name: str):
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def _frame_tensor(img) -> Tensor:
    """A PIL image -> (3, H, W) uint8."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _stack(frames: list[Tensor], source: str) -> Tensor:
    sizes = {tuple(f.shape) for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"{source}: frames differ in size {sorted(sizes)}; a clip's frames must share one size")
    return torch.stack(frames)  # (F, 3, H, W)


def _read_frames(paths: Sequence[Path], source: str) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    frames = []
    for p in paths:
        try:
            with Image.open(p) as im:
                frames.append(_frame_tensor(im))
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{p}: not a readable image ({e})") from e
    return _stack(frames, source)


def _read_animated(path: Path) -> Clip:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            frames, durations = [], []
            for fr in ImageSequence.Iterator(im):
                frames.append(_frame_tensor(fr))
                durations.append(fr.info.get("duration") or 0)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: not a readable animated image ({e})") from e
    ms = sum(durations) / len(durations) if durations else 0
    return Clip(_stack(frames, str(path)), 1000.0 / ms if ms > 0 else None, str(path))


def _read_video_file(path: Path) -> Clip:
    try:
        import av
    except ImportError:
        raise ImportError(f"{path}: decoding {path.suffix} files needs PyAV: pip install 'emor3[video]'") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)
                      for f in container.decode(stream)]
    except (av.error.FFmpegError, OSError, IndexError) as e:  # IndexError: a file without a video stream
        raise ValueError(f"{path}: not a readable video ({e})") from e
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    return Clip(torch.stack(frames), float(rate) if rate else None, str(path))


def read_clip(source: str | Path | Sequence[str | Path], *, fps: float | None = None) -> Clip:
    """Decode every frame of a clip: a folder of frame images (sorted by name, numbers as numbers), a list of frame
    paths, an animated GIF / WebP, or a video file (PyAV). `fps` sets the frame rate (required in practice for a
    folder or list; overrides the file's own otherwise)."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: frame file not found ({len(missing)} of {len(paths)} missing)")
        if not paths:
            raise ValueError("read_clip: the frame list is empty")
        return Clip(_read_frames(paths, f"{paths[0].parent}/[{len(paths)} frames]"), fps,
                    f"{paths[0].parent}/[{len(paths)} frames]")
    path = Path(source)
    if path.is_dir():
        paths = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES),
                       key=lambda p: _natural_key(p.name))
        if not paths:
            raise ValueError(f"{path}: the folder holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        return Clip(_read_frames(paths, str(path)), fps, str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: clip not found")
    suffix = path.suffix.lower()
    if suffix in ANIMATED_SUFFIXES:
        clip = _read_animated(path)
    elif suffix in VIDEO_SUFFIXES:
        clip = _read_video_file(path)
    else:
        raise ValueError(f"{path}: unknown clip format {suffix!r} (a folder of frames, .gif, .webp, "
                         f"{', '.join(VIDEO_SUFFIXES)})")
    return replace(clip, fps=fps) if fps is not None else clip
