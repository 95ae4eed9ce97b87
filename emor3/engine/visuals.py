"""The images and clips of a `PromptBatch`, kept in step with its prompts.

A prompt batch carries two visual streams in prompt order: images (`pixel_values`, `image_grid_thw`, `num_images`)
and clips (`pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`, `num_videos`). A prompt may hold images,
clips, both or neither; a batch may mix such prompts.
1. `visual_part(v)`: the chat-message part of a visual: `{"type": "video"}` for a `Clip`, else `{"type": "image"}`.
2. `select_visuals(batch, prompts)` / `concat_visuals(batches)`: the visual fields of some prompts (in that order,
   repeats allowed) or of stacked batches, so sub-batches and stacks keep every prompt with its own pixels.
3. `encode_visuals(model, batch)`: image and clip features, each visual encoded once (the vision tower serves both).
4. `row_embeds(embeds, batch, token_id, prompt_index)`: a stream's features repeated for the rows that continue
   each prompt (a prompt's G rows share one encoding).

Shape legend: B prompts, N rows, I images, V clips, M visual tokens, D hidden size.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from emor3.models.clips import Clip
from emor3.models.processing import PromptBatch


def is_clip(visual: Any) -> bool:
    return isinstance(visual, Clip)


def visual_part(visual: Any) -> dict:
    """The message part that stands for `visual` in a chat turn (`Processor.encode_prompts` format)."""
    return {"type": "video"} if is_clip(visual) else {"type": "image"}


def _ranges(grid: torch.Tensor | None, counts: Sequence[int], B: int) -> tuple[list[range], list[range]]:
    """Per prompt: the range of its visuals (rows of `grid`) and of their patches (rows of the pixel tensor)."""
    per = grid.prod(-1).tolist() if grid is not None else []
    counts = list(counts) if counts else [0] * B
    items, patches, i, p = [], [], 0, 0
    for k in counts:
        n = sum(per[i:i + k])
        items.append(range(i, i + k))
        patches.append(range(p, p + n))
        i, p = i + k, p + n
    return items, patches


def _take(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return t[torch.tensor(idx, dtype=torch.long, device=t.device)]


def select_visuals(batch: PromptBatch, prompts: Sequence[int], *, num_images: Sequence[int] | None = None,
                   num_videos: Sequence[int] | None = None) -> dict:
    """The visual fields (`PromptBatch` keyword arguments) of prompts `prompts` of `batch`, in that order; a stream
    none of them uses is None. `num_images` / `num_videos`: the visuals per prompt, for a batch that does not say."""
    B = batch.input_ids.shape[0]
    get = lambda name, default=None: getattr(batch, name, default)  # noqa: E731 (a duck-typed batch may lack clips)
    out: dict = {}
    items, patches = _ranges(get("image_grid_thw"), get("num_images") or num_images or [], B)
    ii = [i for b in prompts for i in items[b]]
    pp = [p for b in prompts for p in patches[b]]
    out["pixel_values"] = _take(batch.pixel_values, pp) if ii else None
    out["image_grid_thw"] = _take(batch.image_grid_thw, ii) if ii else None
    out["num_images"] = [len(items[b]) for b in prompts]
    clips, vpatches = _ranges(get("video_grid_thw"), get("num_videos") or num_videos or [], B)
    vi = [i for b in prompts for i in clips[b]]
    vp = [p for b in prompts for p in vpatches[b]]
    out["pixel_values_videos"] = _take(batch.pixel_values_videos, vp) if vi else None
    out["video_grid_thw"] = _take(batch.video_grid_thw, vi) if vi else None
    out["second_per_grid_ts"] = _take(batch.second_per_grid_ts, vi) if vi else None
    out["num_videos"] = [len(clips[b]) for b in prompts] if vi else []
    return out


def concat_visuals(batches: Sequence[PromptBatch]) -> dict:
    """The visual fields of batches stacked in order."""
    def cat(name: str):
        parts = [getattr(b, name) for b in batches if getattr(b, name) is not None]
        return torch.cat(parts) if parts else None

    any_clip = any(b.video_grid_thw is not None for b in batches)
    return dict(pixel_values=cat("pixel_values"), image_grid_thw=cat("image_grid_thw"),
                num_images=[k for b in batches for k in b.num_images],
                pixel_values_videos=cat("pixel_values_videos"), video_grid_thw=cat("video_grid_thw"),
                second_per_grid_ts=cat("second_per_grid_ts"),
                num_videos=[k for b in batches for k in (b.num_videos or [0] * b.input_ids.shape[0])]
                if any_clip else [])


def encode_visuals(model, batch: PromptBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(image features, clip features) of the batch's prompts in prompt order, each visual encoded once; None for
    a stream the batch does not use."""
    image_embeds = video_embeds = None
    if getattr(batch, "pixel_values", None) is not None:
        image_embeds = model.encode_images(batch.pixel_values, batch.image_grid_thw)  # (M_i, D)
    if getattr(batch, "pixel_values_videos", None) is not None:
        video_embeds = model.encode_videos(batch.pixel_values_videos, batch.video_grid_thw)  # (M_v, D)
    return image_embeds, video_embeds


def row_embeds(embeds: torch.Tensor | None, batch: PromptBatch, token_id: int,
               prompt_index: torch.Tensor) -> torch.Tensor | None:
    """One stream's prompt features (M, ...) repeated for rows (N,) continuing prompts `prompt_index`: the features
    that fill the rows' `token_id` slots in row-major order, as the model's `forward` expects."""
    if embeds is None:
        return None
    per_prompt = (batch.input_ids == token_id).sum(dim=1)  # (B,)
    assert embeds.shape[0] == int(per_prompt.sum()), "visual features do not match the prompts' visual tokens"
    starts = torch.cumsum(per_prompt, 0) - per_prompt  # (B,)
    counts = per_prompt[prompt_index]  # (N,)
    offsets = torch.arange(int(counts.sum()), device=embeds.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    return embeds[torch.repeat_interleave(starts[prompt_index], counts) + offsets]
