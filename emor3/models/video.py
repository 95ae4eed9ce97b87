"""Clips for the Qwen-VL video input: sampling their frames at an fps, resizing them to a pixel budget and cutting
them into the flattened temporal patches the vision tower takes.

The rules are transformers 5.24's `Qwen2VLVideoProcessor` (Qwen2-VL, Qwen2.5-VL: family "qwen2") and
`Qwen3VLVideoProcessor` (family "qwen3"), written here without torchvision (which those classes need):
  1. Sampling (`sample_indices`): from F decoded frames at `source_fps`, keep n frames.
     qwen2: n = F / source_fps * fps, clamped to [min_frames, min(max_frames, F) rounded down to even], rounded down
       to a multiple of the temporal patch; frames arange(0, F, F / n) truncated.
     qwen3: n = int(F / source_fps * fps), clamped to [min_frames, min(max_frames, F)]; frames
       linspace(0, F - 1, n) rounded. `fps=None` keeps every frame (transformers' `do_sample_frames=False`), and
       beyond `max_frames` keeps max_frames of them spread evenly (linspace, rounded; transformers keeps them all).
  2. Resizing (`resized_hw`): each side a multiple of patch x merge, aspect ratio kept.
     qwen2: `min_pixels` / `max_pixels` bound one frame; with `cap_pixels_per_frame` the per-frame bound is also at
       most an even share of a total budget (90% of `max_video_tokens` tokens' pixels, x temporal patch / n).
     qwen3: `min_pixels` / `max_pixels` bound the whole clip (n x h x w); with `cap_pixels_per_frame` each frame is
       at most `max_video_tokens` tokens' pixels and the budget's even share.
     Both floor the capped per-frame budget at 1.05 x min_pixels. The resampling is bicubic with antialiasing on
     uint8 frames (`torch.nn.functional.interpolate`, the kernel torchvision's `resize` calls on CPU).
  3. Padding and patches (`patchify`): an odd frame count is padded by repeating the last frame (the temporal patch
     spans two frames); frames are rescaled to [0, 1], normalised by mean / std, and flattened to
     (t * h * w, C * temporal_patch * patch * patch) rows in the vision tower's order (merge blocks contiguous).
Times the prompt needs: Qwen2.5-VL's `second_per_grid_t` = temporal_patch / sampled fps (absolute-time M-RoPE,
`emor3.models.positions.video_rope_grids`); Qwen3-VL's per-patch timestamps = the mean time of the patch's first
and last frame, written `<t.t seconds>` before each patch's tokens.

Clips come from `emor3.models.clips.read_clip` (re-exported here): a folder of frames, a list of frame paths, an
animated GIF or WebP, or a video file through the optional PyAV extra.

Shape legend: F decoded frames, n sampled frames, C channels, H x W source size, h x w resized size,
t = n / temporal_patch temporal patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .clips import Clip, read_clip

__all__ = ["Clip", "read_clip", "VideoSettings", "ProcessedClips", "sample_indices", "smart_resize", "resized_hw",
           "resize_frames", "patchify", "patch_timestamps", "preprocess_clips"]

Family = Literal["qwen2", "qwen3"]
FAMILIES: tuple[str, ...] = ("qwen2", "qwen3")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class VideoSettings:
    """Every number of clip preprocessing; `for_model` gives transformers' defaults of each family."""

    family: Family
    fps: float | None = 2.0  # frames kept per second of clip; None keeps every frame (at most max_frames)
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 32 * 32  # qwen2: per frame; qwen3: whole clip
    max_pixels: int = 768 * 32 * 32  # qwen2: per frame; qwen3: whole clip
    cap_pixels_per_frame: bool = False  # also bound each frame by its share of a total budget (qwen-vl-utils)
    max_video_tokens: int = 768  # qwen2: the total budget in tokens (context); qwen3: tokens per frame
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = HALF
    image_std: tuple[float, ...] = HALF
    default_source_fps: float | None = None  # rate assumed for a clip without one (qwen3: 24, as transformers)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"video family {self.family!r} is not one of {FAMILIES}")
        if self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ValueError(f"frame counts must satisfy 1 <= min_frames {self.min_frames} <= max_frames "
                             f"{self.max_frames}")
        if self.min_pixels <= 0 or self.max_pixels < self.min_pixels:
            raise ValueError(f"pixel budget must satisfy 0 < min_pixels {self.min_pixels} <= max_pixels "
                             f"{self.max_pixels}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps {self.fps} must be positive (or None to keep every frame)")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def for_model(cls, model_type: str, **overrides) -> "VideoSettings":
        """transformers 5.24's video processor defaults for `model_type` ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
        except that qwen2 samples at 2 fps here (transformers keeps every frame unless asked to sample)."""
        if model_type in ("qwen2_vl", "qwen2_5_vl"):
            base = dict(family="qwen2", min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, max_video_tokens=128000,
                        patch_size=14, image_mean=CLIP_MEAN, image_std=CLIP_STD)
        elif model_type == "qwen3_vl":
            base = dict(family="qwen3", min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32, max_video_tokens=768,
                        patch_size=16, image_mean=HALF, image_std=HALF, default_source_fps=24.0)
        else:
            raise ValueError(f"no video settings for model_type {model_type!r}")
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, model_type: str, d: dict, *, source: str = "video_preprocessor_config.json",
                  defaults: dict | None = None) -> "VideoSettings":
        """`for_model` defaults, then `defaults`, overridden by a transformers video processor config (`size`
        {shortest_edge, longest_edge} or min/max_pixels, fps, min/max_frames, do_sample_frames, patch / merge /
        temporal sizes, mean, std, cap_pixels_per_frame, max_video_tokens). Keys of no meaning for the pixels (the
        processor class, rescale and resample settings at their only supported values) are accepted; others are
        named."""
        d = dict(d)
        kw: dict = {}
        size = d.pop("size", None) or {}
        for key, ours in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
            if key in size:
                kw[ours] = int(size[key])
        for key in ("min_pixels", "max_pixels", "min_frames", "max_frames", "patch_size", "temporal_patch_size",
                    "merge_size", "max_video_tokens"):
            if d.get(key) is not None:
                kw[key] = int(d.pop(key))
            else:
                d.pop(key, None)
        if d.get("fps") is not None:
            kw["fps"] = float(d.pop("fps"))
        d.pop("fps", None)
        if d.pop("do_sample_frames", True) is False:
            kw["fps"] = None
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                kw[key] = tuple(float(x) for x in d.pop(key))
        if d.get("cap_pixels_per_frame") is not None:
            kw["cap_pixels_per_frame"] = bool(d.pop("cap_pixels_per_frame"))
        problems = []
        if abs(float(d.pop("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
            problems.append("rescale_factor other than 1/255")
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.pop(key, True) is not True:
                problems.append(f"{key}=false")
        if d.pop("resample", 3) != 3:
            problems.append("resample other than bicubic (3)")
        if d.pop("num_frames", None) is not None:
            problems.append("num_frames (sample at fps instead)")
        ignored = {"video_processor_type", "image_processor_type", "processor_class", "return_metadata",
                   "default_to_square", "data_format", "input_data_format", "device", "do_center_crop",
                   "crop_size", "do_pad", "max_duration", "max_image_size", "video_metadata", "return_tensors"}
        unknown = sorted(set(d) - ignored)
        if unknown:
            problems.append(f"unknown settings {unknown}")
        if problems:
            raise ValueError(f"{source}: unsupported video settings: " + "; ".join(problems))
        return cls.for_model(model_type, **{**(defaults or {}), **kw})


# ----------------------------------------------------------------------------------------------- the steps
def sample_indices(num_frames: int, source_fps: float | None, s: VideoSettings, *, source: str = "<clip>") -> list[int]:
    """Indices of the frames kept from a clip of `num_frames` frames decoded at `source_fps` (rule 1)."""
    if s.fps is None:  # a clip without a usable rate (a folder of frames): every frame, up to max_frames of them
        if num_frames <= s.max_frames:
            return list(range(num_frames))
        return np.linspace(0, num_frames - 1, s.max_frames).round().astype(int).tolist()
    if source_fps is None:
        source_fps = s.default_source_fps
    if source_fps is None:
        raise ValueError(f"{source}: sampling at {s.fps} fps needs the clip's frame rate; pass fps= when reading it "
                         "(a folder of frames has none)")
    tp = s.temporal_patch_size
    if s.family == "qwen2":
        hi = math.floor(min(s.max_frames, num_frames) / tp) * tp
        n = min(max(num_frames / source_fps * s.fps, s.min_frames), hi, num_frames)
        n = math.floor(n / tp) * tp
        if n <= 0:
            raise ValueError(f"{source}: {num_frames} frames are too few for a temporal patch of {tp}")
        return torch.arange(0, num_frames, num_frames / n).int().tolist()
    n = int(num_frames / source_fps * s.fps)
    n = min(max(n, s.min_frames), s.max_frames, num_frames)
    return np.linspace(0, num_frames - 1, n).round().astype(int).tolist()


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int,
                 num_frames: int = 1, temporal_factor: int = 1) -> tuple[int, int]:
    """(h, w): multiples of `factor` near (height, width) with the same aspect ratio whose pixel count, times the
    frame count rounded to `temporal_factor`, lies in [min_pixels, max_pixels] (Qwen2-VL's `smart_resize` for one
    frame; with num_frames, Qwen3-VL's video one over the whole clip)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resized_hw(num_frames: int, height: int, width: int, s: VideoSettings) -> tuple[int, int]:
    """The size every frame of an n-frame clip is resized to (rule 2)."""
    f, n = s.factor, num_frames
    if s.family == "qwen2":
        max_px = s.max_pixels
        if s.cap_pixels_per_frame:
            total = int(s.max_video_tokens * f * f * 0.9)
            max_px = max(min(max_px, total * s.temporal_patch_size // n), int(s.min_pixels * 1.05))
        return smart_resize(height, width, factor=f, min_pixels=s.min_pixels, max_pixels=max_px)
    if n < s.temporal_patch_size:
        raise ValueError(f"{n} frames are fewer than the temporal patch {s.temporal_patch_size}")
    if height < f or width < f:  # a side under one merged patch: scale up first, as Qwen3-VL's smart_resize
        scale = max(f / height, f / width)
        height, width = int(height * scale), int(width * scale)
    max_px = s.max_pixels
    if s.cap_pixels_per_frame:
        per_frame = max(min(s.max_video_tokens * f * f, s.max_pixels // n), int(s.min_pixels * 1.05))
        max_px = per_frame * n
    return smart_resize(height, width, factor=f, min_pixels=s.min_pixels, max_pixels=max_px, num_frames=n,
                        temporal_factor=s.temporal_patch_size)


def resize_frames(frames: Tensor, h: int, w: int) -> Tensor:
    """(n, C, H, W) uint8 -> (n, C, h, w) uint8: bicubic with antialiasing on uint8, as torchvision's CPU resize
    (unchanged when the size already matches)."""
    if frames.shape[-2:] == (h, w):
        return frames
    return F.interpolate(frames, size=(h, w), mode="bicubic", align_corners=False, antialias=True)


def patchify(frames: Tensor, s: VideoSettings) -> tuple[Tensor, tuple[int, int, int]]:
    """(n, C, h, w) uint8 -> normalised patches (t*gh*gw, C*tp*p*p) float32 and the grid (t, gh, gw) (rule 3)."""
    n, C, h, w = frames.shape
    tp, p, m = s.temporal_patch_size, s.patch_size, s.merge_size
    assert h % (p * m) == 0 and w % (p * m) == 0, f"frame {h}x{w} is not a multiple of patch x merge {p * m}"
    # fused rescale + normalise as transformers: (x - 255 mean) / (255 std) in float32
    mean = torch.tensor(s.image_mean, dtype=torch.float32) * 255.0  # (C,)
    std = torch.tensor(s.image_std, dtype=torch.float32) * 255.0  # (C,)
    x = (frames.float() - mean[:, None, None]) / std[:, None, None]  # (n, C, h, w)
    if pad := -n % tp:  # repeat the last frame so the temporal patches are whole
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        n += pad
    t, gh, gw = n // tp, h // p, w // p
    x = x.view(t, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/m, gw/m, m, m, C, tp, p, p)
    return x.reshape(t * gh * gw, C * tp * p * p), (t, gh, gw)


def patch_timestamps(indices: list[int], source_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's times (Qwen3-VL's prompt times; the
    last patch padded with the last frame as `patchify` pads)."""
    idx = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch_size)
    sec = [i / source_fps for i in idx]
    return [(sec[i] + sec[i + temporal_patch_size - 1]) / 2 for i in range(0, len(sec), temporal_patch_size)]


@dataclass
class ProcessedClips:
    """Clips ready for the vision tower, in order."""

    pixel_values_videos: Tensor  # (video patches, C * tp * p * p) float32
    video_grid_thw: Tensor  # (V, 3) long: temporal patches, patch rows, patch columns
    second_per_grid_ts: list[float]  # (V,) seconds per temporal patch (Qwen2.5-VL's M-RoPE time)
    timestamps: list[list[float]]  # per clip, seconds of each temporal patch (Qwen3-VL's prompt text)
    frame_indices: list[list[int]] = field(default_factory=list)  # per clip, the decoded frames kept

    def tokens(self, merge_size: int = 2) -> list[int]:
        """Merged video tokens of each clip."""
        return (self.video_grid_thw.prod(-1) // merge_size ** 2).tolist()


def preprocess_clips(clips: Sequence[Clip], s: VideoSettings) -> ProcessedClips:
    """Sample, resize, pad and patchify each clip (rules 1-3)."""
    pix, grids, spg, stamps, kept = [], [], [], [], []
    for clip in clips:
        idx = sample_indices(clip.num_frames, clip.fps, s, source=clip.source)
        frames = clip.frames[idx]  # (n, C, H, W)
        h, w = resized_hw(len(idx), frames.shape[-2], frames.shape[-1], s)
        patches, grid = patchify(resize_frames(frames, h, w), s)
        pix.append(patches)
        grids.append(grid)
        src_fps = clip.fps or s.default_source_fps or 24.0  # transformers' fallback rate
        # sampled rate = kept frames per second of clip (transformers' VideoMetadata.sampled_fps)
        sampled_fps = len(idx) / clip.num_frames * src_fps
        spg.append(s.temporal_patch_size / sampled_fps)
        stamps.append(patch_timestamps(idx, src_fps, s.temporal_patch_size))
        kept.append(idx)
    return ProcessedClips(torch.cat(pix), torch.tensor(grids, dtype=torch.long).reshape(-1, 3), spg, stamps, kept)
