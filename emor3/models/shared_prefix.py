"""Teacher-forced log-probs of G completions per prompt with each prompt run through the decoder once.

In GRPO the G completions of a prompt share that prompt, and the prompt (an image of hundreds of tokens and the SET
instruction) is most of the tokens. Scoring the N = B·G rows as N independent sequences of P + T tokens (what
``QwenVL.logprobs`` on ``teacher_forcing_inputs`` does) runs every prompt G times, forward and backward. Here:

1. The B prompts run once (their images encoded once, no copies of the image features), layer by layer.
2. At every layer, row n's T completion tokens attend over prompt ``prompt_index[n]``'s rotated keys and values
   of that layer, followed by their own causal keys and values; the prompt's keys are gathered to the rows
   (``index_select``), so autograd sums the gradient of every completion that attends to a prompt back onto that
   prompt's activations, the vision tower included.
3. Token t of a completion is predicted from position t - 1 of the completion stream, and token 0 from the
   prompt's last position (left padding puts a real token there), exactly as in the unshared sequence.

This is the same computation as the unshared one, not an approximation: every query sees the same keys, values,
positions and mask; only the order of float sums differs (tested to 1e-5 in fp32, log-probs and gradients, in
tests/test_shared_prefix.py). The masks follow ``QwenVL.forward``'s rule (``decoder_mask``): left-padded prompt
slots are hidden, completion slots after the stop token are hidden, every query sees its own slot. M-RoPE positions:
the prompt's come from the ``PromptBatch``; a completion's continue from its prompt's ``next_position``, equal on
the three axes (``decode_position_ids``), as in the sampler. Each decoder layer is called once with both streams
(``DecoderLayer.forward(..., prefix=...)``), so gradient checkpointing recomputes one layer's prompt and completion
work together and FSDP2 sees one call per unit.

Cost per layer (projections and MLP): B·P + N·T tokens instead of N·(P + T); attention: the prompts' causal
B·P²/2 plus N·T·(P + T/2) instead of N·(P + T)²/2.

Shape legend: B prompts, G samples per prompt, N rows, P prompt length, T completion length, D hidden size,
M image tokens of the B prompts, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .positions import decode_position_ids
from .processing import PromptBatch
from .qwen_vl import decoder_mask, maybe_checkpoint

__all__ = ["SHARED_PREFIX_MODEL_TYPES", "shared_prefix_hidden", "shared_prefix_logprobs"]

# Models whose decoder this module reproduces layer by layer: their rotary (`model.rope`) and in-decoder image
# features (`model.deepstack` / `add_deepstack`, Qwen3-VL's DeepStack, which only the prompt stream holds) are the
# model's own; a model type not listed is refused rather than guessed at.
SHARED_PREFIX_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _check_model(model) -> None:
    if getattr(model.config, "model_type", None) not in SHARED_PREFIX_MODEL_TYPES:
        raise ValueError(f"shared-prefix scoring supports model types {SHARED_PREFIX_MODEL_TYPES}, not "
                         f"{getattr(model.config, 'model_type', None)!r}; score this model unshared")


def shared_prefix_hidden(model, batch: PromptBatch, prompt_index: Tensor, completion_ids: Tensor,
                         completion_mask: Tensor, *, image_embeds: Tensor | None = None,
                         video_embeds: Tensor | None = None) -> Tensor:
    """Final-norm hidden states (N, T, D) that predict the T completion tokens: row n's position t is the state
    the unshared sequence prompt[index[n]] + completion[n] has right before completion token t.

    ``image_embeds``: the B prompts' image features (M, D), Qwen3-VL (M, 1 + K, D), in prompt order, as
    ``model.encode_images`` returns them (once per prompt); required when the prompts hold image tokens.
    ``video_embeds``: the same for the prompts' clips (``model.encode_videos``)."""
    _check_model(model)
    ids_p, mask_p, pos_p = batch.input_ids, batch.attention_mask, batch.position_ids
    B, P = ids_p.shape
    N, T = completion_ids.shape
    assert prompt_index.shape == (N,) and completion_mask.shape == (N, T), "prompt_index (N,), completion_mask (N, T)"
    assert mask_p.shape == (B, P) and pos_p.shape == (3, B, P), "PromptBatch fields must be (B, P) and (3, B, P)"
    if not bool(mask_p[:, -1].all()):
        raise ValueError("shared-prefix scoring needs left-padded prompts (a real token in every prompt's last slot)")
    dev = ids_p.device
    index = prompt_index.to(dev)
    comp_ids = completion_ids.to(dev)
    comp_mask = completion_mask.to(device=dev, dtype=mask_p.dtype)

    xp = model.embed(ids_p, image_embeds, video_embeds)  # (B, P, D)
    xc = model.model.embed_tokens(comp_ids)  # (N, T, D): completions never hold image tokens
    cos_p, sin_p = model.rope(pos_p, xp.dtype)  # (B, P, hd)
    cos_c, sin_c = model.rope(decode_position_ids(batch.next_position.to(dev)[index], 0, T), xc.dtype)  # (N, T, hd)
    # the prompts' DeepStack features (Qwen3-VL), else None
    deepstack = model.deepstack(ids_p, image_embeds, video_embeds)

    causal_p = torch.ones(P, P, dtype=torch.bool, device=dev).tril()  # (P, P)
    m_p = decoder_mask(causal_p, torch.eye(P, dtype=torch.bool, device=dev), mask_p)  # (B, 1, P, P)
    # completion queries: every prompt slot is before them (hidden where padding), own slots causally
    causal_c = torch.cat([torch.ones(T, P, dtype=torch.bool, device=dev),
                          torch.ones(T, T, dtype=torch.bool, device=dev).tril()], dim=1)  # (T, P + T)
    self_c = torch.cat([torch.zeros(T, P, dtype=torch.bool, device=dev),
                        torch.eye(T, dtype=torch.bool, device=dev)], dim=1)  # (T, P + T)
    m_c = decoder_mask(causal_c, self_c, torch.cat([mask_p.index_select(0, index), comp_mask], dim=1))  # (N,1,T,P+T)

    use_ckpt = model.gradient_checkpointing and model.training
    for i, layer in enumerate(model.model.layers):
        # as QwenVL.forward, one checkpoint per layer: its prompt and completion work are recomputed together
        xc, xp = maybe_checkpoint(use_ckpt, lambda xc_, xp_, lay=layer, i_=i: lay(
            xc_, cos_c, sin_c, m_c, i_, None, None, prefix=(xp_, cos_p, sin_p, m_p, index)), xc, xp)
        xp = model.add_deepstack(xp, i, deepstack)  # as QwenVL.forward: after the layer, on the image tokens
    # token 0 is predicted from the prompt's last position, token t > 0 from completion position t - 1
    last = xp[:, -1:].index_select(0, index)  # (N, 1, D)
    return model.model.norm(torch.cat([last, xc[:, :T - 1]], dim=1))  # (N, T, D)


def shared_prefix_logprobs(model, batch: PromptBatch, prompt_index: Tensor, completion_ids: Tensor,
                           completion_mask: Tensor, *, image_embeds: Tensor | None = None, temperature: float = 1.0,
                           chunk_size: int = 128, return_entropy: bool = False, video_embeds: Tensor | None = None):
    """float32 log-probs (N, T) of the completions (with return_entropy also the entropy (N, T)), equal to
    ``model.logprobs`` on the unshared (N, P + T) sequences; chunked over tokens by ``model.logprobs_from_hidden``.

    ``image_embeds`` (M, D): the prompts' image features if already computed (the caller decides whether they carry
    gradient); otherwise they are encoded here, once per prompt."""
    _check_model(model)
    if image_embeds is None and batch.pixel_values is not None:
        image_embeds = model.encode_images(batch.pixel_values, batch.image_grid_thw)  # (M, D)
    if video_embeds is None and getattr(batch, "pixel_values_videos", None) is not None:
        video_embeds = model.encode_videos(batch.pixel_values_videos, batch.video_grid_thw)  # (M_v, D)
    hidden = shared_prefix_hidden(model, batch, prompt_index, completion_ids, completion_mask,
                                  image_embeds=image_embeds, video_embeds=video_embeds)  # (N, T, D)
    return model.logprobs_from_hidden(hidden, completion_ids.to(hidden.device), temperature=temperature,
                                      chunk_size=chunk_size, return_entropy=return_entropy)
