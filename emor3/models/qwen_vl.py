"""Qwen2-VL and Qwen2.5-VL in pure PyTorch: vision tower, text decoder with a static KV cache, chunked log-probs.

Architecture (checked line by line against transformers 5.24 `modeling_qwen2_vl.py` / `modeling_qwen2_5_vl.py`;
parity is pinned by tests/test_models_parity.py):
  Text decoder (both): token embedding -> L x [RMSNorm -> GQA attention (q/k/v bias, no o bias, M-RoPE) -> residual
    -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head (tied to the embedding or not).
    M-RoPE (Qwen2-VL paper, section 2.1): the rotary frequencies of each head are split by `mrope_section` into
    three groups driven by the temporal, height and width position ids respectively; text tokens have the same id
    on all three axes.
  Vision (Qwen2-VL): Conv3d patch embed (done here as one matmul over the flattened patch, identical maths),
    2-D axial rotary (h and w halves), LayerNorm blocks with fused qkv and QuickGELU MLP, attention confined to each
    image, PatchMerger (LayerNorm, 2x2 patches concatenated, MLP with exact GELU).
  Vision (Qwen2.5-VL): RMSNorm blocks, SwiGLU MLP with bias, window attention: patches are reordered so that each
    `window_size` x `window_size` pixel window is contiguous, blocks listed in `fullatt_block_indexes` attend over
    the whole image, the others within windows; the merger uses RMSNorm; the window order is undone at the end.
  Video (both): a clip is a (t, h, w) grid whose patches span two frames each (`temporal_patch_size`), so the same
    tower encodes it (`encode_videos`); attention and windows stay within each temporal patch, as for a one-frame
    image. Its features fill the video tokens (`video_embeds`), image features the image tokens, in one scatter.

Choices that differ from transformers, on purpose:
  - No hidden state on the model: M-RoPE position ids are always passed in (computed statelessly by
    `emor3.models.positions`); transformers caches `rope_deltas` on the module, which goes stale between
    generate() and a training forward, a known source of wrong GRPO log-probs.
  - `forward` takes precomputed `image_embeds` (and `video_embeds`), so a prompt's image or clip is encoded once
    and shared by its G rows.
  - A preallocated static `KVCache`, written by position (`index_copy_`), so shapes never change while decoding.
  - Attention padding: every query may attend to its own slot, so left-pad rows never have an all-masked softmax
    (which gives NaN in SDPA and poisons gradients through 0 * NaN); their outputs are never used.
  - Vision attention over variable-length segments (images or windows) is batched by segment length: one SDPA call
    per distinct length instead of one per segment (transformers loops) or one n x n mask (quadratic memory).
  - A decoder layer can run a second stream of prompt rows whose keys and values the main rows attend to before
    their own (`DecoderLayer.forward(..., prefix=...)`), so that G completions share one pass over their prompt
    (`emor3.models.shared_prefix`).
  - `logprobs` computes log_softmax(lm_head(h) / temperature) (and the entropy) in token chunks through
    `_ChunkLogprob`, an autograd function with a hand-written backward that keeps only the chunk's hidden states
    and recomputes its (chunk, V) logits there, so the (N, T, V) logits are never held whole, forward or backward.

Shape legend: N rows (= B prompts x G samples), L query length, S cache slots, T target tokens, D text hidden,
V vocab, H heads, K kv heads, hd head dim, M merged image tokens (all images), n vision patches, C vision width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import QwenVLConfig, TextConfig, VisionConfig


# ----------------------------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, exactly as Qwen2RMSNorm (bf16 parity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def activation(name: str):
    if name == "silu":
        return F.silu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)  # transformers QuickGELUActivation
    if name == "gelu":
        return F.gelu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unsupported activation {name!r}")


def maybe_checkpoint(enabled: bool, fn, *args):
    # non-reentrant checkpoint: works with kwargs-free closures, frozen inputs and torch.compile
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ----------------------------------------------------------------------------------------------- KV cache
@dataclass
class KVCache:
    """Static cache: k, v are (layers, N, K, S, hd), written by position; never reallocated while decoding."""

    k: Tensor  # (layers, N, K, S, hd)
    v: Tensor  # (layers, N, K, S, hd)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: Tensor, v: Tensor, cache_position: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (N, K, L, hd) at slots `cache_position` (L,) of `layer`; return the layer's full (N,K,S,hd)."""
        self.k[layer].index_copy_(2, cache_position, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, cache_position, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def repeat_interleave(self, repeats: int) -> "KVCache":
        """Copy each row's cache to `repeats` consecutive rows (prefill once per prompt, decode G samples)."""
        return KVCache(self.k.repeat_interleave(repeats, dim=1), self.v.repeat_interleave(repeats, dim=1))


@dataclass
class GroupedKVCache:
    """Decode cache of N = B·G rows whose G consecutive rows continue one of B prompts, the prompt's keys and
    values kept once (the "cascade" / shared-prefix decode of FlashInfer and Hydragen): at one query per row, the
    G·H/K queries of a prompt's rows on one kv head attend over the prompt's keys together, then each row over its
    own generated keys, and the two partial attentions are merged by their log-sum-exps (on the CPU: SDPA's flash
    kernel, which returns them; elsewhere both parts' scores go through one softmax). Every row sees the keys,
    values and mask of the full-cache decode; only the order of float sums differs from SDPA over the copied cache
    (a non-exact, opt-in path: the sampler's ``shared_prefix_decode``).

    Generated token t (0-based) is written at ``slot`` P + t of the full-cache numbering, i.e. own slot t here;
    a step attends over the first W own slots, all of them written (the sampler narrows to W = t + 1)."""

    prefix_k: Tensor  # (layers, B, K, P, hd): the prompts' keys, written by the prefill
    prefix_v: Tensor  # (layers, B, K, P, hd)
    prefix_mask: Tensor  # (B, 1, 1, P) float: 0 on the prompts' real tokens, -inf on left padding
    k: Tensor  # (layers, N, K, W, hd): the rows' generated keys (W slots, a prefix view of the full storage)
    v: Tensor  # (layers, N, K, W, hd)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def prefix_len(self) -> int:
        return self.prefix_k.shape[3]

    @property
    def max_len(self) -> int:
        return self.prefix_len + self.k.shape[3]

    @staticmethod
    def from_prefill(cache: "KVCache", prompt_mask: Tensor, length: int, group_size: int,
                     new_tokens: int) -> "GroupedKVCache":
        """The B-row prefill ``cache`` (its first ``length`` slots hold the prompts, ``prompt_mask`` (B, length)
        marks their real tokens) as the prefix of B·G rows with room for ``new_tokens`` generated tokens each."""
        L, B, K, _, hd = cache.k.shape
        own = (L, B * group_size, K, new_tokens, hd)
        mask = torch.zeros(B, 1, 1, length, dtype=cache.k.dtype, device=cache.k.device)
        mask = mask.masked_fill(~prompt_mask.bool()[:, None, None, :], float("-inf"))  # (B, 1, 1, P)
        # the prompt slots copied out of the longer prefill cache once (B rows), contiguous for the kernels
        return GroupedKVCache(cache.k[:, :, :, :length].contiguous(), cache.v[:, :, :, :length].contiguous(), mask,
                              cache.k.new_zeros(own), cache.v.new_zeros(own))

    def window(self, slots: int) -> "GroupedKVCache":
        """The same cache attending over its first ``slots`` generated slots (views of the same storage)."""
        return GroupedKVCache(self.prefix_k, self.prefix_v, self.prefix_mask, self.k.narrow(3, 0, slots),
                              self.v.narrow(3, 0, slots))

    def materialize(self, slots: int) -> "KVCache":
        """The equivalent per-row ``KVCache`` of ``slots`` slots (layers, N, K, slots, hd): the prompt's slots
        copied to each of its rows, the generated ones after them (to go on decoding with the plain cache, e.g.
        once finished rows are dropped)."""
        L, N, K, W, hd = self.k.shape
        P, G = self.prefix_len, N // self.prefix_k.shape[1]
        assert P + W <= slots, f"{P} prompt + {W} generated slots do not fit in {slots}"
        out = []
        for pre, own in ((self.prefix_k, self.k), (self.prefix_v, self.v)):
            full = own.new_zeros(L, N, K, slots, hd)
            full[:, :, :, :P] = pre.repeat_interleave(G, dim=1)
            full[:, :, :, P:P + W] = own
            out.append(full)
        return KVCache(*out)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, cache_position: Tensor, *,
               flash: bool | None = None) -> Tensor:
        """Write one generated token's k, v (N, K, 1, hd) at full-cache slot ``cache_position`` (1,) and return the
        attention output (N, H, 1, hd) of queries q (N, H, 1, hd) over the prompt's slots and the W own ones.
        ``flash``: merge two flash-kernel calls by log-sum-exp (CPU only; the default there) or one softmax over
        matrix-product scores (the default elsewhere)."""
        N, H, L, hd = q.shape
        B, K, P = self.prefix_k.shape[1], self.prefix_k.shape[2], self.prefix_len
        assert L == 1 and N % B == 0, f"grouped decode takes one query per row of B = {B} groups, got {tuple(q.shape)}"
        G, r = N // B, H // K
        self.k[layer].index_copy_(2, cache_position - P, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, cache_position - P, v.to(self.v.dtype))
        # query head h reads kv head h // r (transformers' repeat_kv grouping), as SDPA's enable_gqa does
        q = q.reshape(N, K, r, hd)  # (N, K, r, hd)
        qg = q.view(B, G, K, r, hd).transpose(1, 2).reshape(B, K, G * r, hd)  # (B, K, G·r, hd): a prompt's rows
        pk, pv = self.prefix_k[layer].to(q.dtype), self.prefix_v[layer].to(q.dtype)  # (B, K, P, hd)
        ok, ov = self.k[layer].to(q.dtype), self.v[layer].to(q.dtype)  # (N, K, W, hd)
        if flash if flash is not None else q.device.type == "cpu":
            kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # what SDPA runs here, plus the lse
            o_pre, lse_pre = kernel(qg, pk, pv, attn_mask=self.prefix_mask.to(q.dtype))  # (B,K,G·r,hd), (B,K,G·r)
            o_own, lse_own = kernel(q, ok, ov)  # (N, K, r, hd), (N, K, r): every own slot is written
            o_pre = o_pre.view(B, K, G, r, hd).transpose(1, 2).reshape(N, K, r, hd)
            lse_pre = lse_pre.view(B, K, G, r).transpose(1, 2).reshape(N, K, r)
            top = torch.maximum(lse_pre, lse_own)  # (N, K, r), finite: the own slot is always seen
            w_pre, w_own = (lse_pre - top).exp(), (lse_own - top).exp()  # each part's share of the normaliser
            o = (o_pre * w_pre[..., None] + o_own * w_own[..., None]) / (w_pre + w_own)[..., None]
            return o.to(q.dtype).reshape(N, H, 1, hd)
        scale = hd ** -0.5  # SDPA's default
        s_pre = torch.matmul(qg * scale, pk.transpose(-1, -2)) + self.prefix_mask.to(q.dtype)  # (B, K, G·r, P)
        s_pre = s_pre.view(B, K, G, r, P).transpose(1, 2).reshape(N, K, r, P)  # (N, K, r, P)
        scores = torch.cat([s_pre, torch.matmul(q * scale, ok.transpose(-1, -2))], dim=-1)  # (N, K, r, P + W)
        probs = scores.softmax(dim=-1)
        p_pre = probs[..., :P].reshape(B, G, K, r, P).transpose(1, 2).reshape(B, K, G * r, P)  # (B, K, G·r, P)
        o_pre = torch.matmul(p_pre, pv).view(B, K, G, r, hd).transpose(1, 2)  # (B, G, K, r, hd)
        o = o_pre.reshape(N, K, r, hd) + torch.matmul(probs[..., P:], ov)  # (N, K, r, hd)
        return o.reshape(N, H, 1, hd)


# ----------------------------------------------------------------------------------------------- text decoder
def mrope_cos_sin(position_ids: Tensor, cfg: TextConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (N, L, hd) for M-RoPE from position ids (3, N, L).

    Frequency j of the head dim is driven by axis a(j), where mrope_section = (s_t, s_h, s_w) gives the first s_t
    frequencies to the temporal ids, the next s_h to height, the last s_w to width (transformers
    `recomposition_frequencies`); the half is then duplicated for rotate_half.
    """
    assert position_ids.dim() == 3 and position_ids.shape[0] == 3, "position_ids must be (3, N, L)"
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32,
                                                      device=position_ids.device) / hd))  # (hd/2,)
    s_t, s_h, _ = cfg.mrope_section
    j = torch.arange(hd // 2, device=position_ids.device)
    # the axis of each frequency, by comparisons only: no host-to-device copy and no sync, so a decode step that
    # computes it can be captured as a CUDA graph
    axis = (j >= s_t).long() + (j >= s_t + s_h).long()  # (hd/2,): 0 temporal, 1 height, 2 width
    pos = position_ids.float()  # (3, N, L)
    # pick for each frequency the position id of its axis: (N, L, hd/2)
    pos_per_freq = pos.permute(1, 2, 0)[..., axis]
    freqs = pos_per_freq * inv_freq  # (N, L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def decoder_mask(causal: Tensor, self_slot: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Boolean SDPA mask (N, 1, L, S) (or (1, 1, L, S) without `attention_mask`): query l sees slot s where
    `causal` (L, S) allows it and `attention_mask` (N, S) marks s valid, and always its own slot `self_slot` (L, S),
    so that padding queries never get an all-masked softmax (NaN in SDPA, and 0 * NaN in the gradients)."""
    if attention_mask is None:
        return causal[None, None]  # (1, 1, L, S)
    return ((causal[None] & attention_mask.bool()[:, None, :]) | self_slot[None])[:, None]  # (N, 1, L, S)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        D, H, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.H, self.K, self.hd = H, K, D // H
        self.q_proj = nn.Linear(D, H * self.hd, bias=True)
        self.k_proj = nn.Linear(D, K * self.hd, bias=True)
        self.v_proj = nn.Linear(D, K * self.hd, bias=True)
        self.o_proj = nn.Linear(H * self.hd, D, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, layer: int,
                cache: KVCache | None, cache_position: Tensor | None, *,
                prefix_kv: tuple[Tensor, Tensor] | None = None, return_kv: bool = False):
        """Attention output (N, L, D). `prefix_kv` (k, v), each (N, K, P, hd) and already rotated, are keys and
        values placed before the L own ones (then `mask` is (N, 1, L, P + L)); `return_kv` also returns the own
        rotated (k, v), each (N, K, L, hd), for other rows to attend to (emor3.models.shared_prefix)."""
        N, L, _ = x.shape
        q, k, v = self.project(x, cos, sin)  # (N, H, L, hd), (N, K, L, hd) x 2
        own = (k, v)
        if isinstance(cache, GroupedKVCache):  # one decode step of G rows per prompt, the prompt's keys kept once
            o = cache.attend(layer, q, k, v.to(q.dtype), cache_position)  # (N, H, 1, hd)
            return self.o_proj(o.transpose(1, 2).reshape(N, L, self.H * self.hd))
        if cache is not None:
            k, v = cache.update(layer, k, v, cache_position)  # (N, K, S, hd)
        if prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)  # (N, K, P + L, hd)
        # GQA: query head h reads kv head h // (H/K), transformers' repeat_kv grouping; SDPA does it without copying
        # K and V out to every query head (a copy of the whole cache per layer per decode step otherwise)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if L == 1 and self.K != self.H and mask.shape[1] == 1:
            # one decode step: the H/K query heads of a kv head become H/K queries of one attention over that kv
            # head (the mask, one row per sequence, is the same for all of them), so each K/V block is read once
            # by a (H/K, hd) x (hd, S) product instead of H/K single-row ones (~1.5x faster at 5 heads per kv head
            # on CPU); the same sums, so the same result up to float rounding
            o = F.scaled_dot_product_attention(q.view(N, self.K, self.H // self.K, self.hd), k, v,
                                               attn_mask=mask).reshape(N, self.H, 1, self.hd)  # (N, H, 1, hd)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.K != self.H)  # (N, H, L, hd)
        out = self.o_proj(o.transpose(1, 2).reshape(N, L, self.H * self.hd))
        return (out, own) if return_kv else out

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries (N, H, L, hd), rotated keys (N, K, L, hd) and values (N, K, L, hd) of x (N, L, D)."""
        N, L, _ = x.shape
        q = self.q_proj(x).view(N, L, self.H, self.hd).transpose(1, 2)  # (N, H, L, hd)
        k = self.k_proj(x).view(N, L, self.K, self.hd).transpose(1, 2)  # (N, K, L, hd)
        v = self.v_proj(x).view(N, L, self.K, self.hd).transpose(1, 2)  # (N, K, L, hd)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, L, hd)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s, v


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, layer, cache, cache_position, *, prefix=None):
        """x (N, L, D) -> (N, L, D). With `prefix` = (xp, cos_p, sin_p, mask_p, index), a second stream of B prompt
        rows xp (B, P, D) runs through the layer first (its own causal `mask_p`, no cache) and row n of x attends
        over prompt `index[n]`'s keys and values before its own (`mask` is then (N, 1, L, P + L)); returns
        (x, xp). Both streams go through one call, so per-layer wrappers (checkpointing, FSDP) see one call."""
        if prefix is None:
            return self._block(x, cos, sin, mask, layer, cache, cache_position)
        xp, cos_p, sin_p, mask_p, index = prefix
        xp, (k, v) = self._block(xp, cos_p, sin_p, mask_p, layer, None, None, return_kv=True)  # k, v (B, K, P, hd)
        # each prompt's keys go to all of its rows; the backward sums their gradients back onto the prompt
        kv = (_PromptRows.apply(k, index), _PromptRows.apply(v, index))  # (N, K, P, hd) each
        return self._block(x, cos, sin, mask, layer, None, None, prefix_kv=kv), xp

    def _block(self, x, cos, sin, mask, layer, cache, cache_position, *, prefix_kv=None, return_kv=False):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, cache, cache_position,
                           prefix_kv=prefix_kv, return_kv=return_kv)
        a, kv = a if return_kv else (a, None)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, kv) if return_kv else x


class _PromptRows(torch.autograd.Function):
    """``x.index_select(0, index)`` (row n of the result is prompt ``index[n]``'s row of x (B, ...)), whose backward
    is ``index_select``'s, ``zeros.index_add_(0, index, grad)``, computed as running sums when the rows are the
    usual GRPO layout (G consecutive rows per prompt, prompts in order): the same additions in the same order
    (0 + g_0 + g_1 + ... + g_{G-1}), hence the same bits, without the scatter kernel, which is slow on the CPU for
    these strided gradients."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        B, N = ctx.rows, grad.shape[0]
        G = N // B if B else 0
        grouped = G * B == N and G > 0 and torch.equal(index, torch.arange(B, device=index.device).repeat_interleave(G))
        if not grouped:
            return grad.new_zeros((B, *grad.shape[1:])).index_add_(0, index, grad), None
        g = grad.view(B, G, *grad.shape[1:])  # (B, G, ...): prompt b's rows
        out = g[:, 0] + 0.0  # 0 + g_0, as index_add_ into zeros (-0.0 becomes +0.0 there too)
        for j in range(1, G):
            out += g[:, j]
        return out, None


class TextModel(nn.Module):
    """Named `model` inside QwenVL so parameter names equal the published layout (`model.layers.0...`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------------------------- vision tower
class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: list[tuple[Tensor, int]]) -> Tensor:
        n, C = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, C // self.heads).unbind(1)  # each (n, H, hd)
        # rotary in fp32, as transformers' apply_rotary_pos_emb_vision
        c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()  # (n, 1, hd)
        q = (q.float() * c + rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + rotate_half(k.float()) * s).to(x.dtype)
        out = None  # (n, H, hd), in the attention's output dtype (bf16 under autocast while x is fp32)
        for idx, _ in segments:  # idx (num_segments, len): token indices of equal-length segments
            qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # (S_, H, len, hd)
            o = F.scaled_dot_product_attention(qs, ks, vs)  # (S_, H, len, hd)
            if out is None:
                out = o.new_empty(n, self.heads, C // self.heads)
            out = out.index_put((idx.reshape(-1),), o.transpose(1, 2).reshape(-1, self.heads, C // self.heads))
        return self.proj(out.reshape(n, C))


class VisionMLP(nn.Module):  # Qwen2-VL
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, v25: bool):
        super().__init__()
        C = cfg.hidden_size
        if v25:
            self.norm1, self.norm2 = RMSNorm(C, 1e-6), RMSNorm(C, 1e-6)
            self.mlp = MLP(C, cfg.intermediate_size, bias=True, act=cfg.hidden_act)
        else:
            self.norm1, self.norm2 = nn.LayerNorm(C, eps=1e-6), nn.LayerNorm(C, eps=1e-6)
            self.mlp = VisionMLP(C, cfg.intermediate_size, cfg.hidden_act)
        self.attn = VisionAttention(C, cfg.num_heads)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p, t = cfg.patch_size, cfg.temporal_patch_size
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=(t, p, p), stride=(t, p, p), bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # a stride == kernel Conv3d over one patch is a matmul with the flattened kernel (same element order
        # C, t, p, p as the processor's flattening); much faster than Conv3d on CPU
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))  # (n, C)


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig, v25: bool):
        super().__init__()
        C, m2 = cfg.hidden_size, cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(C, 1e-6) if v25 else nn.LayerNorm(C, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(C * m2, C * m2), nn.GELU(), nn.Linear(C * m2, cfg.out_hidden_size))
        self.m2 = m2

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_q(x)
        return self.mlp(x.reshape(-1, x.shape[-1] * self.m2))  # (n / m^2, D)


def equal_length_segments(lengths: list[int], device) -> list[tuple[Tensor, int]]:
    """Group consecutive segments (lengths in token order) by length: [(indices (count, len), len)]."""
    starts, pos = [], 0
    for ln in lengths:
        starts.append(pos)
        pos += ln
    groups: dict[int, list[int]] = {}
    for st, ln in zip(starts, lengths):
        if ln > 0:
            groups.setdefault(ln, []).append(st)
    out = []
    for ln, sts in groups.items():
        idx = torch.tensor(sts, device=device)[:, None] + torch.arange(ln, device=device)  # (count, len)
        out.append((idx, ln))
    return out


def vision_rotary(grid_thw: list[list[int]], merge: int, head_dim: int, theta: float,
                  device) -> tuple[Tensor, Tensor]:
    """2-D axial rotary cos, sin (n, hd) in the processor's patch order (merge blocks of m x m contiguous)."""
    m, hd = merge, head_dim
    pos = []
    for t, h, w in grid_thw:
        hp = torch.arange(h, device=device)[:, None].expand(h, w)
        wp = torch.arange(w, device=device)[None, :].expand(h, w)
        blk = (h // m, m, w // m, m)
        hp = hp.reshape(blk).transpose(1, 2).flatten()
        wp = wp.reshape(blk).transpose(1, 2).flatten()
        pos.append(torch.stack([hp, wp], -1).repeat(t, 1))
    pos = torch.cat(pos).float()  # (n, 2)
    inv = 1.0 / (theta ** (torch.arange(0, hd // 2, 2, dtype=torch.float32, device=device) / (hd // 2)))  # (hd/4,)
    freqs = (pos[:, :, None] * inv).reshape(pos.shape[0], -1)  # (n, hd/2): h freqs then w freqs
    emb = torch.cat([freqs, freqs], -1)  # (n, hd)
    return emb.cos(), emb.sin()


class VisionTower(nn.Module):
    """Named `visual` inside QwenVL (published key layout `visual.*`)."""

    def __init__(self, cfg: VisionConfig, v25: bool):
        super().__init__()
        self.cfg, self.v25 = cfg, v25
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg, v25) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, v25)
        self.gradient_checkpointing = False

    def _rotary(self, grid_thw: list[list[int]], device) -> tuple[Tensor, Tensor]:
        return vision_rotary(grid_thw, self.cfg.spatial_merge_size, self.cfg.hidden_size // self.cfg.num_heads,
                             self.cfg.rope_theta, device)

    def _window_index(self, grid_thw: list[list[int]], device) -> tuple[Tensor, list[int]]:
        """Qwen2.5-VL window order over merged tokens and the window lengths in patches.

        Each image's (h/m, w/m) merged grid is cut into windows of `window_size / patch / m` merged tokens a side
        (edge windows smaller); windows are laid out row-major, tokens inside a window row-major
        (transformers `get_vision_window_index`).
        """
        m = self.cfg.spatial_merge_size
        ws = self.cfg.window_size // m // self.cfg.patch_size
        index, lengths, offset = [], [], 0
        for t, h, w in grid_thw:
            gh, gw = h // m, w // m
            ids = torch.arange(t * gh * gw, device=device).view(t, gh, gw)
            for ti in range(t):
                for r0 in range(0, gh, ws):
                    for c0 in range(0, gw, ws):
                        win = ids[ti, r0:r0 + ws, c0:c0 + ws].reshape(-1)
                        index.append(win + offset)
                        lengths.append(win.numel() * m * m)
            offset += t * gh * gw
        return torch.cat(index), lengths

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        g = grid_thw.tolist()
        device = pixel_values.device
        m2 = self.cfg.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values)  # (n, C)
        n = x.shape[0]
        assert n == sum(t * h * w for t, h, w in g), f"pixel_values has {n} patches, grid_thw says otherwise"
        cos, sin = self._rotary(g, device)  # (n, hd)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        # full attention within each frame of each image
        full = equal_length_segments([h * w for t, h, w in g for _ in range(t)], device)
        if self.v25:
            win_idx, win_len = self._window_index(g, device)  # (n / m^2,)
            patch_idx = (win_idx[:, None] * m2 + torch.arange(m2, device=device)).reshape(-1)  # (n,)
            x, cos, sin = x[patch_idx], cos[patch_idx], sin[patch_idx]
            windowed = equal_length_segments(win_len, device)
            fullatt = set(self.cfg.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            seg = full if (not self.v25 or i in fullatt) else windowed
            x = maybe_checkpoint(self.gradient_checkpointing and self.training,
                                  lambda x_, b=blk, s=seg: b(x_, cos, sin, s), x)
        out = self.merger(x)  # (M, D)
        if self.v25:
            out = out[torch.argsort(win_idx)]  # undo the window order
        return out


def attention_mask_4d(N: int, L: int, attention_mask: Tensor | None, cache: KVCache | None,
                      cache_position: Tensor | None, device) -> Tensor:
    """Boolean SDPA mask (N or 1, 1, L, S) for L queries: causal, padding from `attention_mask` (N, S), and every
    query sees its own slot (so a left-pad row never has an all-masked softmax). S = L without a cache, else the
    cache length, the queries sitting at slots `cache_position` (L,)."""
    if cache is not None:
        assert cache_position is not None and cache_position.shape == (L,), "cache needs cache_position (L,)"
        S = cache.max_len
        slots = torch.arange(S, device=device)
        causal = slots[None, :] <= cache_position[:, None]  # (L, S)
        self_slot = slots[None, :] == cache_position[:, None]  # (L, S)
    else:
        S = L
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # (L, L)
        self_slot = torch.eye(L, dtype=torch.bool, device=device)
    if attention_mask is not None:
        assert attention_mask.shape == (N, S), f"attention_mask {tuple(attention_mask.shape)} != ({N}, {S})"
    return decoder_mask(causal, self_slot, attention_mask)  # (N or 1, 1, L, S)


# ----------------------------------------------------------------------------------------------- the model
class QwenVL(nn.Module):
    """Qwen2-VL / Qwen2.5-VL for conditional generation. Parameter names follow the published checkpoints."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision, v25=config.model_type == "qwen2_5_vl")
        self.model = TextModel(config.text)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.gradient_checkpointing = False

    # --------------------------------------------------------------- options
    def set_gradient_checkpointing(self, enabled: bool = True) -> "QwenVL":
        """Recompute each decoder layer / vision block in backward (non-reentrant)."""
        self.gradient_checkpointing = enabled
        self.visual.gradient_checkpointing = enabled
        return self

    def freeze_vision(self, frozen: bool = True) -> "QwenVL":
        """Stop gradients into the vision tower and merger (common for RL fine-tuning of VLMs)."""
        for p in self.visual.parameters():
            p.requires_grad_(not frozen)
        return self

    @property
    def lm_head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "QwenVL":
        """Random init as transformers' `_init_weights` (normal(0, std) weights, zero biases, unit norms)."""
        g = torch.Generator().manual_seed(seed)
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Conv3d, nn.Embedding)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, (RMSNorm, nn.LayerNorm)):
                mod.weight.fill_(1.0)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
        return self

    # --------------------------------------------------------------- vision
    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """Merged image tokens of all images in order: (M, D), M = sum(t*h*w) / merge^2."""
        return self.visual(pixel_values, image_grid_thw)

    def encode_videos(self, pixel_values_videos: Tensor, video_grid_thw: Tensor) -> Tensor:
        """Merged video tokens of all clips in order: (M, D), M = sum(t*h*w) / merge^2. The same tower as images:
        a clip is t temporal patches of two frames each (the patch embedding spans them), and attention stays
        within each temporal patch (transformers' cu_seqlens per frame)."""
        return self.visual(pixel_values_videos, video_grid_thw)

    def visual_tokens(self, input_ids: Tensor, image_embeds: Tensor | None,
                      video_embeds: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """(where (N, L) bool: the image and video tokens that features fill; features (M_i + M_v, ...) in
        row-major order of those tokens), or None without features. Images fill the image tokens in order and clips
        the video tokens in order (as transformers' separate masked_scatter calls do); a mixed batch interleaves
        them here by position, so one scatter serves both."""
        if video_embeds is None and input_ids.shape[1] > 1 and bool((input_ids == self.config.video_token_id).any()):
            # a clip's tokens embedded as plain tokens would be a silently wrong input; decode steps (one token,
            # never a banned vision token) skip the check and its device sync
            raise ValueError("input_ids hold video tokens but no video_embeds were given (encode_videos them; the "
                             "sampler, scoring and judge paths do not pass clips yet)")
        parts = []
        for embeds, tok, name in ((image_embeds, self.config.image_token_id, "image"),
                                  (video_embeds, self.config.video_token_id, "video")):
            if embeds is None:
                continue
            self._check_embeds(embeds, name)
            is_tok = input_ids == tok  # (N, L)
            n_tok = int(is_tok.sum())
            if n_tok != embeds.shape[0]:
                raise ValueError(f"input_ids hold {n_tok} {name} tokens but {name}_embeds has {embeds.shape[0]}"
                                 " rows (each of a prompt's G rows needs its own copy of the embeds)")
            parts.append((is_tok, embeds))
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        (is_img, img), (is_vid, vid) = parts
        where = is_img | is_vid  # (N, L)
        img_slot = is_img[where]  # (M_i + M_v,) True where the k-th visual token is an image token
        feats = img.new_zeros((img_slot.shape[0],) + tuple(img.shape[1:]))  # (M_i + M_v, ...)
        feats = feats.index_put((img_slot.nonzero(as_tuple=True)[0],), img)
        feats = feats.index_put(((~img_slot).nonzero(as_tuple=True)[0],), vid.to(img.dtype))
        return where, feats

    def _check_embeds(self, embeds: Tensor, name: str) -> None:
        if embeds.dim() != 2:
            raise ValueError(f"{name}_embeds {tuple(embeds.shape)} must be (M, D) as encode_{name}s returns them")

    # --------------------------------------------------------------- text
    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        t = self.config.text
        p = self.model.embed_tokens.weight
        shape = (t.num_hidden_layers, batch_size, t.num_key_value_heads, max_len, t.head_dim)
        device = torch.device(device) if device is not None else p.device
        if dtype is None:  # under autocast the keys and values are computed, hence cached, in the autocast dtype
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else p.dtype
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The decoder's rotary cos, sin (N, L, hd) for position ids (3, N, L): M-RoPE."""
        return mrope_cos_sin(position_ids, self.config.text, dtype)

    def deepstack(self, input_ids: Tensor, image_embeds: Tensor | None, video_embeds: Tensor | None = None):
        """Features the decoder adds to its hidden states after the first layers (Qwen3-VL's DeepStack, see
        `add_deepstack`); this model has none."""
        return None

    def add_deepstack(self, x: Tensor, layer: int, deepstack) -> Tensor:
        """x (N, L, D) after decoder layer `layer`, plus that layer's DeepStack features; unchanged here."""
        return x

    def embed(self, input_ids: Tensor, image_embeds: Tensor | None, video_embeds: Tensor | None = None) -> Tensor:
        x = self.model.embed_tokens(input_ids)  # (N, L, D)
        vis = self.visual_tokens(input_ids, image_embeds, video_embeds)
        if vis is not None:
            where, feats = vis
            # row-major fill of image / video positions; differentiable w.r.t. the embeddings and the features
            x = x.masked_scatter(where.unsqueeze(-1), feats.to(x.dtype))
        return x

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None, *,
                image_embeds: Tensor | None = None, cache: KVCache | None = None,
                cache_position: Tensor | None = None, video_embeds: Tensor | None = None) -> Tensor:
        """Hidden states after the final norm: (N, L, D).

        Without a cache, attention is causal over the L tokens, masked by `attention_mask` (N, L). With a cache,
        the L tokens are written at slots `cache_position` (L,) and attend to every slot s <= their own that
        `attention_mask` (N, S) marks valid.
        """
        N, L = input_ids.shape
        assert position_ids.shape == (3, N, L), f"position_ids {tuple(position_ids.shape)} != (3, {N}, {L})"
        x = self.embed(input_ids, image_embeds, video_embeds)  # (N, L, D)
        cos, sin = self.rope(position_ids, x.dtype)  # (N, L, hd)
        mask = attention_mask_4d(N, L, attention_mask, cache, cache_position, input_ids.device)
        use_ckpt = self.gradient_checkpointing and self.training
        for i, layer in enumerate(self.model.layers):
            x = maybe_checkpoint(use_ckpt and cache is None,
                                  lambda x_, lay=layer, i_=i: lay(x_, cos, sin, mask, i_, cache, cache_position), x)
        return self.model.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """(N, L, D) -> (N, L, V) in the model dtype."""
        return F.linear(hidden, self.lm_head_weight)

    def logprobs(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, num_targets: int, *,
                 image_embeds: Tensor | None = None, temperature: float = 1.0, chunk_size: int = 128,
                 return_entropy: bool = False, video_embeds: Tensor | None = None):
        """float32 log-probs (N, T) of the last T = num_targets tokens, each predicted from the position before.

        log p = log_softmax(lm_head(h) / temperature)[target], computed over chunks of `chunk_size` tokens; each
        chunk is recomputed in backward so at most one (chunk, V) logits block is alive at any time.
        With return_entropy also the entropy (N, T) of the same tempered distribution.
        """
        N, L = input_ids.shape
        T = num_targets
        assert 0 < T < L, f"num_targets {T} must be in [1, {L - 1}]"
        hidden = self.forward(input_ids, position_ids, attention_mask, image_embeds=image_embeds,
                              video_embeds=video_embeds)  # (N, L, D)
        # position l predicts token l+1: the T targets are read from positions L-T-1 .. L-2
        return self.logprobs_from_hidden(hidden[:, L - T - 1:L - 1], input_ids[:, L - T:], temperature=temperature,
                                         chunk_size=chunk_size, return_entropy=return_entropy)

    def logprobs_from_hidden(self, hidden: Tensor, targets: Tensor, *, temperature: float = 1.0,
                             chunk_size: int = 128, return_entropy: bool = False):
        """float32 log_softmax(lm_head(hidden) / temperature)[targets]: hidden (N, T, D), targets (N, T) -> (N, T).

        Chunked over tokens with a hand-written backward (see `_ChunkLogprob`): one (chunk, V) block at a time."""
        N, T = targets.shape
        assert hidden.shape[:2] == (N, T), f"hidden {tuple(hidden.shape)} vs targets {tuple(targets.shape)}"
        h = hidden.reshape(N * T, -1)  # (N*T, D)
        tgt = targets.reshape(N * T)  # (N*T,)
        w = self.lm_head_weight
        lps, ents = [], []
        for s in range(0, N * T, chunk_size):
            lp_c, ent_c = _ChunkLogprob.apply(h[s:s + chunk_size], w, tgt[s:s + chunk_size], float(temperature),
                                              return_entropy)
            lps.append(lp_c)
            ents.append(ent_c)
        lp = torch.cat(lps).view(N, T)  # (N, T)
        if return_entropy:
            return lp, torch.cat(ents).view(N, T)
        return lp


class _ChunkLogprob(torch.autograd.Function):
    """log_softmax(h W^T / tau)[target] (and entropy) for one chunk of tokens, with a hand-written backward.

    Only h is kept for backward; the (c, V) logits are recomputed there and turned into the gradient in place:
      d lp / d z = onehot(target) - p,   d H / d z = -p (z - E_p[z]),   z = h W^T / tau, p = softmax(z),
    so forward and backward each touch one (c, V) fp32 block a few times (autograd's gather/logsumexp backward
    would allocate several). Same maths as the naive path; pinned by tests/test_models_parity.py.
    """

    @staticmethod
    def forward(ctx, h, w, tgt, temperature, want_entropy):
        z = F.linear(h, w).float().div_(temperature)  # (c, V) float32
        lse = torch.logsumexp(z, dim=-1)  # (c,)
        lp = z.gather(-1, tgt[:, None]).squeeze(-1) - lse  # (c,)
        if want_entropy:
            z.sub_(lse[:, None])  # log p
            ent = -(z.exp() * z).sum(-1)  # (c,)
        else:
            ent = lp.new_zeros(lp.shape)
        ctx.save_for_backward(h, w, tgt, lse)
        ctx.temperature, ctx.want_entropy = temperature, want_entropy
        # backward recomputes the logits under the same autocast state as this forward (it runs outside it)
        dev = h.device.type
        ctx.autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, tgt, lse = ctx.saved_tensors
        tau = ctx.temperature
        with torch.autocast(h.device.type, dtype=ctx.autocast or torch.bfloat16, enabled=ctx.autocast is not None):
            z = F.linear(h, w).float().div_(tau)  # (c, V) recomputed
        c = z.shape[0]
        if g_lp is None:
            g_lp = z.new_zeros(c)
        if ctx.want_entropy and g_ent is not None:
            logp = z - lse[:, None]  # (c, V)
            p = logp.exp()
            ez = (p * z).sum(-1, keepdim=True)  # (c, 1)
            grad = p * (-g_lp[:, None] - g_ent[:, None] * (z - ez))  # (c, V)
            del logp, p
        else:
            grad = z.sub_(lse[:, None]).exp_().mul_(-g_lp[:, None])  # -g * p, in place over z
        grad[torch.arange(c, device=grad.device), tgt] += g_lp
        cdt = ctx.autocast or h.dtype  # the matmuls run in the forward's compute dtype
        grad = grad.div_(tau).to(cdt)  # chain rule through z = logits / tau
        gh = (grad @ w.to(cdt)).to(h.dtype) if ctx.needs_input_grad[0] else None  # (c, D)
        gw = (grad.t() @ h.to(cdt)).to(w.dtype) if ctx.needs_input_grad[1] else None  # (V, D)
        return gh, gw, None, None, None
