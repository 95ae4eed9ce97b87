"""Teacher-forced log-probs of completions, and the prompt-batch operations the trainer needs around them.

The trainer (policy, old and reference log-probs), Cold-Start SFT and the distributed ``PolicyScorer`` share:
1. ``teacher_forcing_inputs``: a prompt batch (B rows) and completions (N rows, row n continuing prompt
   ``prompt_index[n]``) -> the (N, P + T) sequences, attention mask and M-RoPE positions the model scores.
   Completion positions come from ``emor3.models.positions.decode_position_ids``, the rule the sampler decodes
   with, so trainer and sampler see identical inputs.
2. ``row_image_embeds`` (and ``emor3.engine.visuals.row_embeds`` for clips too): each prompt's image and clip tokens
   are encoded once and repeated for its rows, never once per row.
3. ``completion_logprobs``: per-token log-probs (and entropy) of the completions under a temperature, with or
   without gradient; with ``shared_prefix`` each prompt runs once for its G rows (``emor3.models.shared_prefix``).
4. ``prompt_slice`` / ``concat_prompt_batches``: sub-batches of whole prompts (micro-batches, DAPO's kept groups)
   and stacks of prompt batches (rollout chunks), each scoring exactly as the same rows of the full batch.

Shape legend: B prompts, G samples per prompt, N = B·G rows, P prompt length, T completion length, M image tokens,
D hidden size.
"""

from __future__ import annotations

from typing import Sequence

import torch

from emor3.models.positions import decode_position_ids
from emor3.models.processing import PromptBatch
from emor3.engine.visuals import concat_visuals, row_embeds, select_visuals
from emor3.models.shared_prefix import shared_prefix_logprobs


def teacher_forcing_inputs(
    batch: PromptBatch, prompt_index: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt rows ``prompt_index`` (N,) followed by completions (N, T) -> input_ids, attention_mask (N, P+T) and
    position_ids (3, N, P+T). Tokens after a completion's stop are masked out of attention and never scored."""
    N, T = completion_ids.shape
    assert prompt_index.shape == (N,) and completion_mask.shape == (N, T)
    device = batch.input_ids.device
    prompt_index = prompt_index.to(device)
    input_ids = torch.cat([batch.input_ids[prompt_index], completion_ids.to(device)], dim=1)  # (N, P+T)
    attention_mask = torch.cat(
        [batch.attention_mask[prompt_index], completion_mask.to(device=device, dtype=batch.attention_mask.dtype)], dim=1
    )  # (N, P+T)
    completion_pos = decode_position_ids(batch.next_position[prompt_index], 0, T)  # (3, N, T)
    position_ids = torch.cat([batch.position_ids[:, prompt_index], completion_pos], dim=2)  # (3, N, P+T)
    return input_ids, attention_mask, position_ids


def image_tokens_per_prompt(batch: PromptBatch, image_token_id: int) -> torch.Tensor:
    return (batch.input_ids == image_token_id).sum(dim=1)  # (B,)


def row_image_embeds(embeds: torch.Tensor, tokens_per_prompt: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """Image features of the prompts (M, D), in prompt order, repeated for rows (N,) -> (sum of rows' tokens, D).

    The result fills the image-token slots of the rows in row-major order, as ``QwenVL.forward`` expects."""
    assert embeds.shape[0] == int(tokens_per_prompt.sum()), "image features do not match the prompts' image tokens"
    starts = torch.cumsum(tokens_per_prompt, 0) - tokens_per_prompt  # (B,)
    counts = tokens_per_prompt[prompt_index]  # (N,)
    # row n takes embeds[starts[p_n] : starts[p_n] + counts[n]]
    offsets = torch.arange(int(counts.sum()), device=embeds.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    return embeds[torch.repeat_interleave(starts[prompt_index], counts) + offsets]


def prompt_slice(batch: PromptBatch, prompts: torch.Tensor) -> PromptBatch:
    """The prompts ``prompts`` (indices, in order) of a batch, with their images and clips; shared left padding is
    trimmed."""
    prompts = prompts.to(batch.input_ids.device)
    used = batch.attention_mask[prompts].sum(0) > 0  # (P,) columns some kept row uses
    first = int(used.nonzero()[0]) if bool(used.any()) else 0
    return PromptBatch(
        input_ids=batch.input_ids[prompts, first:],
        attention_mask=batch.attention_mask[prompts, first:],
        position_ids=batch.position_ids[:, prompts, first:],
        next_position=batch.next_position[prompts],
        **select_visuals(batch, prompts.tolist()),
    )


def concat_prompt_batches(batches: Sequence[PromptBatch], pad_token_id: int) -> PromptBatch:
    """Stack prompt batches, left-padding each to the longest prompt."""
    P = max(b.input_ids.shape[1] for b in batches)

    def left(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (P - t.shape[-1], 0), value=value)

    return PromptBatch(
        input_ids=torch.cat([left(b.input_ids, pad_token_id) for b in batches]),
        attention_mask=torch.cat([left(b.attention_mask, 0) for b in batches]),
        position_ids=torch.cat([left(b.position_ids, 0) for b in batches], dim=1),
        next_position=torch.cat([b.next_position for b in batches]),
        **concat_visuals(batches),
    )


def completion_logprobs(
    model,
    batch: PromptBatch,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    image_embeds: torch.Tensor | None = None,
    return_entropy: bool = False,
    shared_prefix: bool = False,
    video_embeds: torch.Tensor | None = None,
):
    """Teacher-forced log-probs (N, T) of the completions (optionally with entropy (N, T)).

    ``image_embeds`` / ``video_embeds``: the prompts' image / clip features (M, D) if already computed (the caller
    decides whether they carry gradient); otherwise they are encoded here once per prompt. ``shared_prefix``: run
    each prompt through the decoder once for all of its rows (``emor3.models.shared_prefix``, the same numbers up to
    float rounding) instead of N sequences of P + T tokens.
    """
    if shared_prefix:
        return shared_prefix_logprobs(model, batch, prompt_index, completion_ids, completion_mask,
                                      image_embeds=image_embeds, video_embeds=video_embeds, temperature=temperature,
                                      return_entropy=return_entropy)
    if image_embeds is None and batch.pixel_values is not None:
        image_embeds = model.encode_images(batch.pixel_values, batch.image_grid_thw)  # (M_i, D)
    if video_embeds is None and batch.pixel_values_videos is not None:
        video_embeds = model.encode_videos(batch.pixel_values_videos, batch.video_grid_thw)  # (M_v, D)
    index = prompt_index.to(batch.input_ids.device)
    rows_embeds = row_embeds(image_embeds, batch, model.config.image_token_id, index)
    rows_video = row_embeds(video_embeds, batch, model.config.video_token_id, index)
    input_ids, attention_mask, position_ids = teacher_forcing_inputs(batch, prompt_index, completion_ids, completion_mask)
    return model.logprobs(
        input_ids,
        position_ids,
        attention_mask,
        completion_ids.shape[1],
        image_embeds=rows_embeds,
        video_embeds=rows_video,
        temperature=temperature,
        return_entropy=return_entropy,
    )
