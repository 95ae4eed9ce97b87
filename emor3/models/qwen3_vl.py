"""Qwen3-VL (dense: 2B / 4B / 8B, Instruct and Thinking) in pure PyTorch, on the building blocks of `qwen_vl.py`.

Architecture (checked line by line against transformers 5.24 `modeling_qwen3_vl.py`; parity is pinned by
tests/test_qwen3_vl.py):
  Text decoder (Qwen3): token embedding -> L x [RMSNorm -> GQA attention (no q/k/v/o bias; RMSNorm over each
    head's q and k before the rotary; head_dim its own setting) -> residual -> RMSNorm -> SwiGLU MLP -> residual,
    then for the first K layers + the DeepStack feature k at the image positions] -> RMSNorm -> lm_head.
  Interleaved M-RoPE: as in Qwen2-VL, rotary frequency j is driven by the temporal, height or width position id,
    but the axes take turns (j = 0, 3, 6, ... temporal; 1, 4, ... height; 2, 5, ... width, up to 3 * section
    each; the tail temporal) instead of three contiguous blocks, so each axis spans high and low frequencies.
    Position ids themselves are Qwen2.5-VL's for still images (`emor3.models.positions`).
  Vision: 16-px patches (Conv3d with bias, done as one matmul), plus a learned (48 x 48) position embedding
    table resampled bilinearly (align_corners) to each image's patch grid; 2-D axial rotary; LayerNorm blocks
    with fused qkv and a tanh-GELU MLP; full attention within each image (no windows); the final PatchMerger
    (LayerNorm on each patch, 2x2 patches concatenated, MLP with exact GELU).
  DeepStack: the outputs of vision blocks `deepstack_visual_indexes` go through their own mergers (LayerNorm over
    the concatenated 2x2 patches) and are added to the hidden states after decoder layers 0, 1, ... at the image
    tokens.

`encode_images` returns (M, 1 + K, D): slot 0 the merged image tokens that replace the image placeholders, slots
1..K the DeepStack features of the same tokens; `encode_videos` the same for clips, whose DeepStack features are
added at the video tokens (transformers adds image and video ones at their joint positions). Everything downstream
(the sampler, rollout row copies, the RER judge) only indexes image features along dim 0, so it handles both models
unchanged.
Choices that differ from transformers are those of `QwenVL` (no cached rope deltas, static KV cache, image features
passed in, attention masks that never empty a row, vision attention batched by segment length, chunked log-probs),
all inherited.

Shape legend: as qwen_vl.py; K DeepStack features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config_qwen3_vl import Qwen3TextConfig, Qwen3VisionConfig, Qwen3VLConfig
from .qwen_vl import (MLP, Attention, DecoderLayer, KVCache, QwenVL, RMSNorm, VisionAttention, activation,
                      attention_mask_4d, equal_length_segments, maybe_checkpoint, rotate_half, vision_rotary)


# ----------------------------------------------------------------------------------------------- text decoder
def interleaved_mrope_cos_sin(position_ids: Tensor, cfg: Qwen3TextConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (N, L, hd) for interleaved M-RoPE from position ids (3, N, L).

    With mrope_section (s_t, s_h, s_w): frequency j reads the height id if j % 3 == 1 and j < 3 s_h, the width id
    if j % 3 == 2 and j < 3 s_w, else the temporal id (transformers `Qwen3VLTextRotaryEmbedding`)."""
    assert position_ids.dim() == 3 and position_ids.shape[0] == 3, "position_ids must be (3, N, L)"
    hd, dev = cfg.head_dim, position_ids.device
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=dev) / hd))  # (hd/2,)
    j = torch.arange(hd // 2, device=dev)
    _, s_h, s_w = cfg.mrope_section
    # torch.where rather than boolean-mask assignment, which syncs with the device (no CUDA-graph capture then)
    axis = torch.where((j % 3 == 1) & (j < 3 * s_h), 1, torch.where((j % 3 == 2) & (j < 3 * s_w), 2, 0))  # (hd/2,)
    freqs = position_ids.float().permute(1, 2, 0)[..., axis] * inv_freq  # (N, L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Qwen3Attention(Attention):
    """Qwen2's attention (same forward: cache, GQA through SDPA, shared-prefix keys) with Qwen3's projections."""

    def __init__(self, cfg: Qwen3TextConfig):
        nn.Module.__init__(self)
        D, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.K, self.hd = H, K, hd
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, K * hd, bias=False)
        self.v_proj = nn.Linear(D, K * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)  # over each head's hd, shared by the heads
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        N, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(N, L, self.H, self.hd)).transpose(1, 2)  # (N, H, L, hd)
        k = self.k_norm(self.k_proj(x).view(N, L, self.K, self.hd)).transpose(1, 2)  # (N, K, L, hd)
        v = self.v_proj(x).view(N, L, self.K, self.hd).transpose(1, 2)  # (N, K, L, hd)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, L, hd)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s, v


class Qwen3DecoderLayer(DecoderLayer):
    """Qwen2's decoder layer (same forward) around the Qwen3 attention."""

    def __init__(self, cfg: Qwen3TextConfig):
        nn.Module.__init__(self)
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3TextModel(nn.Module):
    """Named `model` inside Qwen3VL (stored as `model.language_model.*` in the published checkpoints)."""

    def __init__(self, cfg: Qwen3TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------------------------- vision tower
class Qwen3PatchEmbed(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        p, t = cfg.patch_size, cfg.temporal_patch_size
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=(t, p, p), stride=(t, p, p), bias=True)

    def forward(self, x: Tensor) -> Tensor:
        # a stride == kernel Conv3d over one patch is a matmul with the flattened kernel (element order C, t, p, p)
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)  # (n, C)


class Qwen3VisionMLP(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = Qwen3VisionMLP(cfg)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class Qwen3PatchMerger(nn.Module):
    """2x2 patches -> one text-width token. `postshuffle` (the DeepStack mergers) normalises the concatenated
    patches, the final merger each patch before concatenation."""

    def __init__(self, cfg: Qwen3VisionConfig, postshuffle: bool):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.width if postshuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.width, self.width)
        self.linear_fc2 = nn.Linear(self.width, cfg.out_hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x.reshape(-1, self.width)) if self.postshuffle else self.norm(x).reshape(-1, self.width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # (n / m^2, D)


class Qwen3VisionTower(nn.Module):
    """Named `visual` inside Qwen3VL (stored as `model.visual.*`)."""

    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = Qwen3PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList([Qwen3VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = Qwen3PatchMerger(cfg, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList(
            [Qwen3PatchMerger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes])
        self.gradient_checkpointing = False

    def position_embeds(self, grid_thw: list[list[int]]) -> Tensor:
        """The learned (side, side) table resampled to each image's (h, w) patch grid, bilinear with aligned
        corners, in the processor's patch order (m x m merge blocks contiguous), repeated over frames: (n, C)
        float32 (transformers blends the table in float32 too)."""
        side, m, C = self.cfg.grid_side, self.cfg.spatial_merge_size, self.cfg.hidden_size
        table = self.pos_embed.weight.float().view(side, side, C).permute(2, 0, 1)[None]  # (1, C, side, side)
        out, done = [], {}
        for t, h, w in grid_thw:
            if (h, w) not in done:
                e = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # (C, h, w)
                done[h, w] = e.permute(1, 2, 0).reshape(h // m, m, w // m, m, C).transpose(1, 2).reshape(h * w, C)
            out.append(done[h, w].repeat(t, 1))
        return torch.cat(out)  # (n, C)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        g = grid_thw.tolist()
        device = pixel_values.device
        x = self.patch_embed(pixel_values)  # (n, C)
        n = x.shape[0]
        assert n == sum(t * h * w for t, h, w in g), f"pixel_values has {n} patches, grid_thw says otherwise"
        x = x + self.position_embeds(g).to(x.dtype)
        # rotary kept in float32: the attention applies it in float32, as transformers does
        cos, sin = vision_rotary(g, self.cfg.spatial_merge_size, self.cfg.hidden_size // self.cfg.num_heads,
                                 self.cfg.rope_theta, device)  # (n, hd)
        segments = equal_length_segments([h * w for t, h, w in g for _ in range(t)], device)
        deep_at = {b: k for k, b in enumerate(self.cfg.deepstack_visual_indexes)}
        feats = [None] * len(deep_at)
        for i, blk in enumerate(self.blocks):
            x = maybe_checkpoint(self.gradient_checkpointing and self.training,
                                 lambda x_, b=blk: b(x_, cos, sin, segments), x)
            if i in deep_at:
                feats[deep_at[i]] = self.deepstack_merger_list[deep_at[i]](x)  # (M, D)
        return torch.stack([self.merger(x)] + feats, dim=1)  # (M, 1 + K, D)


# ----------------------------------------------------------------------------------------------- the model
class Qwen3VL(QwenVL):
    """Qwen3-VL for conditional generation. Same interface as QwenVL (cache, log-probs, options are inherited);
    parameter names as QwenVL's (`model.layers.*`, `visual.*`), mapped to the published `model.language_model.*`
    / `model.visual.*` by the checkpoint IO."""

    def __init__(self, config: Qwen3VLConfig):
        nn.Module.__init__(self)
        self.config = config
        self.visual = Qwen3VisionTower(config.vision)
        self.model = Qwen3TextModel(config.text)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """Image features of all images in order: (M, 1 + K, D); [:, 0] fills the image tokens, [:, 1:] are the
        DeepStack features of the same tokens."""
        return self.visual(pixel_values, image_grid_thw)

    def encode_videos(self, pixel_values_videos: Tensor, video_grid_thw: Tensor) -> Tensor:
        """Video features of all clips in order: (M, 1 + K, D), as `encode_images` (the same tower; each temporal
        patch of two frames is one frame of the grid)."""
        return self.visual(pixel_values_videos, video_grid_thw)

    def _check_embeds(self, embeds: Tensor, name: str) -> None:
        K = len(self.config.vision.deepstack_visual_indexes)
        if embeds.dim() != 3 or embeds.shape[1] != 1 + K:
            raise ValueError(f"{name}_embeds {tuple(embeds.shape)} must be (M, 1 + {K}, D) as encode_{name}s "
                             "returns them (DeepStack features included)")

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return interleaved_mrope_cos_sin(position_ids, self.config.text, dtype)

    def deepstack(self, input_ids: Tensor, image_embeds: Tensor | None, video_embeds: Tensor | None = None):
        """(positions of input_ids' image and video tokens, row-major as `embed` fills them; their DeepStack
        features (M, K, D)), or None without visual features. Clips get DeepStack features like images
        (transformers adds both at the union of image and video positions)."""
        vis = self.visual_tokens(input_ids, image_embeds, video_embeds)
        if vis is None:
            return None
        where, feats = vis
        return where.nonzero(as_tuple=True), feats[:, 1:]

    def add_deepstack(self, x: Tensor, layer: int, deepstack) -> Tensor:
        if deepstack is None or layer >= deepstack[1].shape[1]:
            return x
        where, feats = deepstack
        return x.index_put(where, feats[:, layer].to(x.dtype), accumulate=True)  # + feature `layer` at vision tokens

    def embed(self, input_ids: Tensor, image_embeds: Tensor | None, video_embeds: Tensor | None = None) -> Tensor:
        x = self.model.embed_tokens(input_ids)  # (N, L, D)
        vis = self.visual_tokens(input_ids, image_embeds, video_embeds)
        if vis is not None:
            where, feats = vis
            x = x.masked_scatter(where.unsqueeze(-1), feats[:, 0].to(x.dtype))
        return x

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None, *,
                image_embeds: Tensor | None = None, cache: KVCache | None = None,
                cache_position: Tensor | None = None, video_embeds: Tensor | None = None) -> Tensor:
        """Hidden states after the final norm: (N, L, D); masks and cache as `QwenVL.forward`."""
        N, L = input_ids.shape
        assert position_ids.shape == (3, N, L), f"position_ids {tuple(position_ids.shape)} != (3, {N}, {L})"
        x = self.embed(input_ids, image_embeds, video_embeds)  # (N, L, D)
        ds = self.deepstack(input_ids, image_embeds, video_embeds)
        cos, sin = self.rope(position_ids, x.dtype)  # (N, L, hd)
        mask = attention_mask_4d(N, L, attention_mask, cache, cache_position, input_ids.device)
        use_ckpt = self.gradient_checkpointing and self.training and cache is None
        for i, layer in enumerate(self.model.layers):
            x = maybe_checkpoint(use_ckpt, lambda x_, lay=layer, i_=i: lay(x_, cos, sin, mask, i_, cache,
                                                                           cache_position), x)
            x = self.add_deepstack(x, i, ds)
        return self.model.norm(x)
