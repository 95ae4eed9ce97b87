"""Stateless M-RoPE position ids for left-padded Qwen-VL prompt batches, and their continuation while decoding.

Rule (Qwen2-VL paper section 2.1; transformers 5.24 `Qwen2_5_VLModel.get_rope_index` for still images):
  - a text token at running position p gets (p, p, p), then p += 1;
  - an image whose merged grid is (t, h', w') = (t, h/m, w/m) starting at running position p gives its token
    (ti, r, c) (row-major) the ids (p + ti, p + r, p + c), then p += max(h', w') (transformers 4.x wrote this as
    "next text starts at max id + 1"; identical for still images where t = 1);
  - left padding is skipped (its ids are 0 and never attended to);
  - decoding continues from next_position = max id + 1 of the row, the same on all three axes, +1 per token.
No state is kept anywhere: the same prompt always gives the same ids, whether in generate, a training forward
or a reference-model pass (transformers' cached `rope_deltas` is what goes stale otherwise).

Shape legend: B rows, P prompt length, I images in the batch, T decode steps.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mrope_position_ids(input_ids: Tensor, attention_mask: Tensor | None, image_grid_thw: Tensor | None, *,
                       image_token_id: int, spatial_merge_size: int = 2) -> tuple[Tensor, Tensor]:
    """Position ids (3, B, P) and next_position (B,) for a (left- or right-) padded prompt batch.

    Images are taken from `image_grid_thw` (I, 3) in row-major order of their tokens in `input_ids`; each image
    occupies t*h*w / merge^2 consecutive image tokens. A count mismatch is an error naming the row.
    """
    B, P = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    assert attention_mask.shape == (B, P), f"attention_mask {tuple(attention_mask.shape)} != {(B, P)}"
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    ids_cpu, mask_cpu = input_ids.cpu(), attention_mask.cpu().bool()
    pos = torch.zeros(3, B, P, dtype=torch.long)  # (3, B, P)
    nxt = torch.zeros(B, dtype=torch.long)  # (B,)
    m = spatial_merge_size
    g = 0  # next image in grids
    for b in range(B):
        valid = mask_cpu[b].nonzero().squeeze(-1)  # (P_b,) indices of real tokens
        toks = ids_cpu[b, valid]
        is_img = toks == image_token_id
        row = torch.zeros(3, len(valid), dtype=torch.long)
        p, i = 0, 0
        while i < len(valid):
            if not is_img[i]:
                # a run of text tokens: (p, p+1, ...) on all three axes
                j = i
                while j < len(valid) and not is_img[j]:
                    j += 1
                row[:, i:j] = torch.arange(p, p + j - i)
                p += j - i
                i = j
                continue
            if g >= len(grids):
                raise ValueError(f"row {b}: more image-token runs than images in image_grid_thw ({len(grids)})")
            t, h, w = grids[g]
            gh, gw = h // m, w // m
            n = t * gh * gw
            if i + n > len(valid) or not bool(is_img[i:i + n].all()):
                raise ValueError(f"row {b}: image {g} (grid {t}x{h}x{w}) needs {n} consecutive image tokens")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            row[:, i:i + n] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + p
            p += max(gh, gw)
            i += n
            g += 1
        pos[:, b, valid] = row
        nxt[b] = row.max() + 1 if len(valid) else 0
    if g != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the batch holds image tokens for {g}")
    return pos.to(input_ids.device), nxt.to(input_ids.device)


def decode_position_ids(next_position: Tensor, start: int = 0, length: int = 1) -> Tensor:
    """Position ids (3, N, length) of generated tokens start .. start+length-1 (0 = the first generated token) of
    rows continuing from next_position (N,).

    Generated token t sits at next_position + t on all three axes (text tokens after the prompt). The one place
    this rule is written: the sampler starts from it and counts on, teacher forcing and the RER choice scorer use it
    directly. A new tensor (not a view), so a caller may advance it in place."""
    steps = torch.arange(start, start + length, device=next_position.device)  # (length,)
    pos = next_position[:, None] + steps[None, :]  # (N, length)
    return pos.unsqueeze(0).repeat(3, 1, 1)  # (3, N, length)


def text_position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids (3, N, L) for text-only rows: cumulative count of real tokens, 0 on padding."""
    p = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask.long()  # (N, L)
    return p.unsqueeze(0).expand(3, -1, -1)
