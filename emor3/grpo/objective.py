"""The GRPO objective as pure tensor functions: advantages, KL estimators, the clipped surrogate, aggregation.

Stateless math over tensors: keyword scalars in, ``(value, metrics)`` out where metrics are useful, no config or
trainer objects, no host sync; other projects may import these in their own tests. Every choice and its source is
docs/method.md's "The objective"; the differences between EMO-R3's paper and its release are in the rewards
(emor3/rewards), not here.

Shape legend: B prompts, G samples per prompt, N = B·G rows, T completion length.
"""

from __future__ import annotations

import torch

from emor3.config import AdvScale, KLKind, LossAgg, RatioLevel, choices

# log π − log π_old is clamped to this range before exp (verl: core_algos.compute_policy_loss).
_MAX_LOG_RATIO = 20.0
# k3 is clamped to this range (verl: core_algos.kl_penalty, "low_var_kl").
_K3_CLAMP = 10.0

# the names each choice accepts, declared once in emor3.config
ADVANTAGE_SCALES = choices(AdvScale)
KL_KINDS = choices(KLKind)
AGG_MODES = choices(LossAgg)
RATIO_LEVELS = choices(RatioLevel)


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


# --------------------------------------------------------------------------------------------- advantages


def group_advantages(rewards: torch.Tensor, *, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages: rewards (B, G) -> advantages (B, G), float32.

    ``scale``: "group" divides each centred group by its unbiased std + eps (GRPO), "batch" by the unbiased std of
    all valid rewards in the batch + eps, "none" only centres (Dr.GRPO). NaN rewards are excluded from the mean and
    std and get advantage 0. Groups whose valid rewards are all equal get exactly 0.
    """
    _check_choice("advantage scale", scale, ADVANTAGE_SCALES)
    assert rewards.dim() == 2, f"rewards must be (B, G), got {tuple(rewards.shape)}"
    r = rewards.float()
    valid = ~torch.isnan(r)  # (B, G)
    r0 = torch.where(valid, r, torch.zeros_like(r))  # (B, G) NaN -> 0 so sums stay finite
    count = valid.sum(dim=1, keepdim=True)  # (B, 1)
    mean = r0.sum(dim=1, keepdim=True) / count.clamp(min=1)  # (B, 1)
    centred = torch.where(valid, r - mean, torch.zeros_like(r))  # (B, G)

    # A group is constant when its valid max equals its valid min; decide it by value, not via a tiny std.
    big = torch.finfo(r.dtype).max
    vmax = torch.where(valid, r, torch.full_like(r, -big)).amax(dim=1, keepdim=True)  # (B, 1)
    vmin = torch.where(valid, r, torch.full_like(r, big)).amin(dim=1, keepdim=True)  # (B, 1)
    informative = (vmax > vmin) & (count >= 2)  # (B, 1)

    if scale == "group":
        var = (centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)  # (B, 1) unbiased
        adv = centred / (var.sqrt() + eps)
    elif scale == "batch":
        n = valid.sum()
        batch_mean = r0.sum() / n.clamp(min=1)
        batch_var = (torch.where(valid, r - batch_mean, torch.zeros_like(r)) ** 2).sum() / (n - 1).clamp(min=1)
        adv = centred / (batch_var.sqrt() + eps)
    else:  # "none"
        adv = centred
    return torch.where(valid & informative, adv, torch.zeros_like(adv))  # (B, G)


# --------------------------------------------------------------------------------------------- KL


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from log-probs of the sampled tokens, same shape as ``logp``."""
    _check_choice("KL estimator", kind, KL_KINDS)
    assert logp.shape == ref_logp.shape, f"logp {tuple(logp.shape)} vs ref_logp {tuple(ref_logp.shape)}"
    log_ratio = logp - ref_logp  # log π − log π_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    # k3: with x = log π_ref − log π, KL ≈ e^x − x − 1; clamp x first so exp cannot overflow.
    x = (-log_ratio).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (torch.exp(x) - x - 1).clamp(-_K3_CLAMP, _K3_CLAMP)


# --------------------------------------------------------------------------------------------- policy loss


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate per token -> (per_token_loss (N, T), metrics).

    logp, old_logp, mask: (N, T); advantages: (N,) per sequence or (N, T) per token. The returned loss is not
    masked or averaged: pass it to ``aggregate``. Metrics are detached 0-d tensors (no host sync here):
    clip_frac_low (A < 0 and the ratio fell below 1 − clip_low), clip_frac_high (A > 0 and the ratio rose above
    1 + clip_high), clip_frac_dual (A < 0 and the dual clip capped the loss), ratio_mean/min/max over valid tokens,
    approx_kl_old (mean of log π_old − log π, the k1 estimate of KL(π_old ‖ π)).
    """
    _check_choice("ratio level", level, RATIO_LEVELS)
    N, T = logp.shape
    assert old_logp.shape == (N, T) and mask.shape == (N, T), "logp, old_logp and mask must all be (N, T)"
    if advantages.dim() == 1:
        assert advantages.shape == (N,), f"advantages (N,) expected, got {tuple(advantages.shape)}"
        advantages = advantages[:, None].expand(N, T)  # (N, T) one advantage per sequence, on every token
    assert advantages.shape == (N, T), f"advantages must be (N,) or (N, T), got {tuple(advantages.shape)}"
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -c*A for A < 0), got {dual_clip}")
    mask = mask.to(logp.dtype)
    old_logp = old_logp.detach()
    advantages = advantages.detach().to(logp.dtype)

    log_ratio = logp - old_logp  # (N, T)
    if level == "sequence":
        # GSPO: s_i = exp(mean_t log-ratio), broadcast to tokens through the stop-gradient trick so that each
        # token's gradient is sg[s_i] · ∇log π_t (GSPO-token with a constant advantage per sequence).
        lengths = mask.sum(dim=1).clamp(min=1)  # (N,)
        seq_log_ratio = (log_ratio * mask).sum(dim=1) / lengths  # (N,)
        log_ratio = logp - logp.detach() + seq_log_ratio.detach()[:, None]  # (N, T) value = seq log-ratio
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # (N, T)

    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)  # (N, T) pessimistic bound
    dual_active = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        capped = torch.minimum(loss, -advantages * dual_clip)
        dual_active = (advantages < 0) & (loss > -advantages * dual_clip)
        loss = torch.where(advantages < 0, capped, loss)

    with torch.no_grad():
        valid = mask > 0
        big = torch.finfo(ratio.dtype).max
        metrics = {
            "clip_frac_low": _masked_mean(((advantages < 0) & (ratio < 1.0 - clip_low)).to(mask.dtype), mask),
            "clip_frac_high": _masked_mean(((advantages > 0) & (ratio > 1.0 + clip_high)).to(mask.dtype), mask),
            "clip_frac_dual": _masked_mean(dual_active.to(mask.dtype), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_min": torch.where(valid, ratio, torch.full_like(ratio, big)).min(),
            "ratio_max": torch.where(valid, ratio, torch.full_like(ratio, -big)).max(),
            "approx_kl_old": _masked_mean(-(logp - old_logp), mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------- aggregation


def loss_normalizer(mask: torch.Tensor, *, mode: str = "token-mean", max_len: int | None = None) -> torch.Tensor:
    """The denominator ``aggregate`` uses for this batch, as a 0-d tensor.

    Compute it once over the whole (mini-)batch, sum it over ranks if data-parallel, and pass it as
    ``normalizer`` to ``aggregate`` on every micro-batch: the micro-batch losses then add up to the whole batch's
    loss. "token-mean": number of valid tokens. "seq-mean-*": number of sequences (rows with at least one valid
    token). "seq-mean-token-sum-norm": number of sequences · ``max_len`` (Dr.GRPO's constant; default T).
    """
    _check_choice("loss aggregation", mode, AGG_MODES)
    assert mask.dim() == 2, f"mask must be (N, T), got {tuple(mask.shape)}"
    if mode == "token-mean":
        return mask.sum().to(torch.float32)
    n_seq = (mask.sum(dim=1) > 0).sum().to(torch.float32)
    if mode == "seq-mean-token-sum-norm":
        return n_seq * float(max_len if max_len is not None else mask.shape[1])
    return n_seq


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, *, mode: str = "token-mean", normalizer: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Reduce per-token values (N, T) under ``mask`` to a scalar.

    "token-mean": Σ v·m / Σ m. "seq-mean-token-mean": Σ_i (Σ_t v·m / Σ_t m) / #seqs. "seq-mean-token-sum":
    Σ v·m / #seqs. "seq-mean-token-sum-norm": Σ v·m / (#seqs · T). ``normalizer`` replaces the denominator
    (see ``loss_normalizer``); without it the denominator is this batch's own.
    """
    _check_choice("loss aggregation", mode, AGG_MODES)
    assert values.shape == mask.shape and values.dim() == 2, "values and mask must both be (N, T)"
    mask = mask.to(values.dtype)
    if mode == "seq-mean-token-mean":
        per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (N,)
        numerator = per_seq.sum()
    else:
        numerator = (values * mask).sum()
    if normalizer is None:
        normalizer = loss_normalizer(mask, mode=mode)
    return numerator / torch.as_tensor(normalizer, dtype=values.dtype, device=values.device).clamp(min=1e-8)


# --------------------------------------------------------------------------------------------- DAPO data side


def dynamic_sampling_keep(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling: rewards (B, G) -> keep (B,) bool, True where the group's valid rewards differ.

    A group whose rewards are all equal has zero advantage everywhere and contributes no gradient; DAPO drops it
    and samples more prompts instead (DAPO sec. 3.2). NaN rewards are ignored; a group with fewer than two valid
    rewards is dropped.
    """
    assert rewards.dim() == 2, f"rewards must be (B, G), got {tuple(rewards.shape)}"
    r = rewards.float()
    valid = ~torch.isnan(r)
    big = torch.finfo(r.dtype).max
    vmax = torch.where(valid, r, torch.full_like(r, -big)).amax(dim=1)  # (B,)
    vmin = torch.where(valid, r, torch.full_like(r, big)).amin(dim=1)  # (B,)
    return (vmax > vmin) & (valid.sum(dim=1) >= 2)


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), lengths (N,) -> penalty (N,) float32 in [−1, 0].

    0 up to ``max_len − buffer`` tokens, then a linear ramp down to −1 at ``max_len``, and −1 beyond (a row that
    was truncated at ``max_len`` without finishing should also be given −1 by the caller if desired).
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    length = lengths.float()
    expected = max_len - buffer
    ramp = (expected - length) / buffer
    return torch.where(length <= expected, torch.zeros_like(length), torch.where(length <= max_len, ramp, -torch.ones_like(length)))
