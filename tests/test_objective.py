"""The GRPO objective: hand-derived values, invariants, naive-loop equivalence and gradients."""

import dataclasses
import math

import pytest
import torch

from emor3.config import ALGORITHMS, get_algorithm
from emor3.grpo.objective import (
    AGG_MODES,
    aggregate,
    dynamic_sampling_keep,
    group_advantages,
    kl_penalty,
    loss_normalizer,
    overlong_penalty,
    policy_loss,
)

# ------------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    adv = group_advantages(r, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(1/3) -> ±0.5 * sqrt(3)
    s3 = math.sqrt(3.0)
    torch.testing.assert_close(adv[0], torch.tensor([0.5 * s3, -0.5 * s3, -0.5 * s3, 0.5 * s3]))
    # group 1: mean 0.75, deviations .25,.25,.25,-.75; unbiased var = (3*.0625+.5625)/3 = 0.25 -> std 0.5
    torch.testing.assert_close(adv[1], torch.tensor([0.5, 0.5, 0.5, -1.5]))


def test_group_advantages_scales():
    r = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    torch.testing.assert_close(group_advantages(r, scale="none"), torch.tensor([[0.5, -0.5], [1.0, -1.0]]))
    batch_std = torch.tensor([1.0, 0.0, 3.0, 1.0]).std()  # unbiased, over all rewards
    torch.testing.assert_close(
        group_advantages(r, scale="batch", eps=0.0), torch.tensor([[0.5, -0.5], [1.0, -1.0]]) / batch_std
    )
    with pytest.raises(ValueError, match="valid: group, batch, none"):
        group_advantages(r, scale="std")


def test_group_advantages_zero_mean_per_group_and_naive_loop():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(16, 8, generator=g)
    r[3] = 0.7  # a constant group
    r[5, 2] = float("nan")
    r[6, :7] = float("nan")  # only one valid reward
    adv = group_advantages(r, eps=1e-6)
    assert torch.isfinite(adv).all(), "NaN rewards must not leak into advantages"
    # naive per-group loop
    for b in range(r.shape[0]):
        row = r[b]
        valid = ~torch.isnan(row)
        vals = row[valid]
        expected = torch.zeros_like(row)
        if len(vals) >= 2 and vals.max() > vals.min():
            expected[valid] = (vals - vals.mean()) / (vals.std() + 1e-6)
        torch.testing.assert_close(adv[b], expected, msg=f"vectorised advantages differ from the loop in group {b}")
        assert abs(float(adv[b][valid].sum())) < 1e-5, "advantages must sum to zero over a group's valid members"
    assert (adv[3] == 0).all(), "a constant group must give exactly zero advantage"
    assert adv[5, 2] == 0, "a NaN reward must get advantage 0"
    assert (adv[6] == 0).all(), "a group with one valid reward has no baseline: advantage 0"


def test_constant_group_float_noise_does_not_blow_up():
    # the float32 mean of seven 0.1s is not exactly 0.1: a std-based test would see noise / tiny std = ±1
    r = torch.full((2, 7), 0.1)
    assert (group_advantages(r, eps=0.0) == 0).all(), "constant groups give exact zeros, never NaN or ±1"
    assert (group_advantages(torch.full((2, 4), float("nan"))) == 0).all(), "an all-NaN group gives zeros"


# ------------------------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, kind="k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, kind="k2"), torch.tensor([0.125, 0.5]))
    x = ref - logp
    torch.testing.assert_close(kl_penalty(logp, ref, kind="k3"), torch.exp(x) - x - 1)
    assert (kl_penalty(torch.randn(100), torch.randn(100)) >= 0).all(), "k3 is never negative"
    assert kl_penalty(torch.tensor([-100.0]), torch.tensor([0.0]))[0] == 10.0, "k3 is clamped to 10 (verl)"
    assert torch.isfinite(kl_penalty(torch.tensor([-1e4]), torch.tensor([0.0]))).all(), "k3 must not overflow"
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, kind="k4")


def test_k3_gradient_is_one_minus_ratio():
    logp = torch.tensor([-1.0, -0.3], requires_grad=True)
    ref = torch.tensor([-0.5, -0.9])
    kl_penalty(logp, ref).sum().backward()
    # d/dlogp [e^{ref-logp} - (ref-logp) - 1] = -e^{ref-logp} + 1
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref - logp.detach()))


# ------------------------------------------------------------------------------------------- policy loss


def _one_token(ratio: float, adv: float, **kw):
    old = torch.tensor([[0.0]])
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = policy_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), **kw)
    loss.sum().backward()
    return float(loss.detach()), float(logp.grad), metrics


@pytest.mark.parametrize(
    "ratio, adv, expected_loss, expected_grad",
    [
        # inside the range: loss = -A r, d/dlogp = -A r
        (1.1, 1.0, -1.1, -1.1),
        (0.9, -2.0, 1.8, 1.8),
        # A > 0 above 1 + clip_high (0.3): clipped, constant loss, zero gradient
        (1.5, 1.0, -1.3, 0.0),
        # A > 0 below 1 - clip_low: the unclipped term is the max, gradient flows
        (0.5, 1.0, -0.5, -0.5),
        # A < 0 below 1 - clip_low (0.2): clipped at 0.8
        (0.5, -1.0, 0.8, 0.0),
        # A < 0 between 1 + clip_high and the dual clip 3: unclipped, gradient -A r
        (2.0, -1.0, 2.0, 2.0),
        # A < 0 above the dual clip c = 3: loss capped at -c A = 3, zero gradient
        (5.0, -1.0, 3.0, 0.0),
    ],
)
def test_policy_loss_one_token_value_and_gradient(ratio, adv, expected_loss, expected_grad):
    loss, grad, _ = _one_token(ratio, adv, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    assert loss == pytest.approx(expected_loss, rel=1e-5), "clipped surrogate value"
    assert grad == pytest.approx(expected_grad, rel=1e-5, abs=1e-7), "gradient of the clipped surrogate w.r.t. logp"


def test_policy_loss_without_dual_clip_is_unbounded_for_negative_advantage():
    loss, grad, m = _one_token(5.0, -1.0, clip_low=0.2, clip_high=0.3)
    assert loss == pytest.approx(5.0) and grad == pytest.approx(5.0)
    assert float(m["clip_frac_dual"]) == 0


def test_policy_loss_metrics():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 5.0, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4)
    _, m = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    assert float(m["clip_frac_high"]) == pytest.approx(0.25)  # token 0
    assert float(m["clip_frac_low"]) == pytest.approx(0.25)  # token 1
    assert float(m["clip_frac_dual"]) == pytest.approx(0.25)  # token 2
    assert float(m["ratio_min"]) == pytest.approx(0.5) and float(m["ratio_max"]) == pytest.approx(5.0)
    assert float(m["ratio_mean"]) == pytest.approx(2.0)
    assert float(m["approx_kl_old"]) == pytest.approx(-float(logp.mean()), rel=1e-5)
    # masked tokens are ignored by every metric
    mask2 = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    _, m2 = policy_loss(logp, old, adv, mask2, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    assert float(m2["ratio_max"]) == pytest.approx(1.5) and float(m2["clip_frac_dual"]) == 0


def test_stale_sample_cannot_overflow():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1e4, 0.0]])
    loss, _ = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), clip_high=0.3)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all(), "log-ratio must be clamped before exp"


def test_policy_loss_ratio_one_gives_minus_advantage_gradient():
    # at ratio 1 (first update on fresh samples) the gradient is exactly -A per token: the REINFORCE gradient
    logp = torch.randn(3, 5).requires_grad_()
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, _ = policy_loss(logp, logp.detach().clone(), adv, torch.ones(3, 5), dual_clip=3.0)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(3, 5))


def test_gspo_sequence_ratio_gradient_equals_sequence_objective():
    g = torch.Generator().manual_seed(1)
    N, T = 4, 6
    old = -torch.rand(N, T, generator=g)
    logp0 = old + 0.05 * torch.randn(N, T, generator=g)
    mask = torch.ones(N, T)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    clip = dict(clip_low=0.03, clip_high=0.04)

    logp = logp0.clone().requires_grad_()
    per_token, _ = policy_loss(logp, old, adv, mask, level="sequence", **clip)
    aggregate(per_token, mask, mode="seq-mean-token-mean").backward()

    # the sequence-level objective written directly: s_i = exp(mean_t (logp - old))
    logp_ref = logp0.clone().requires_grad_()
    s = torch.exp(((logp_ref - old) * mask).sum(1) / mask.sum(1))
    seq_loss = torch.maximum(-adv * s, -adv * s.clamp(1 - 0.03, 1 + 0.04))
    seq_loss.mean().backward()
    torch.testing.assert_close(logp.grad, logp_ref.grad, msg="GSPO token-form gradient != sequence objective")
    # the value every token sees is the sequence ratio
    torch.testing.assert_close(
        per_token[0, 0], torch.maximum(-adv[0] * s[0], -adv[0] * s[0].clamp(0.97, 1.04)).detach()
    )
    assert (logp.grad * (1 - mask)).abs().max() == 0, "padding tokens must get no gradient"


def test_policy_loss_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="token, sequence"):
        policy_loss(x, x, torch.zeros(2), x, level="seq")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, torch.zeros(2), x, dual_clip=0.5)
    with pytest.raises(AssertionError):
        policy_loss(x, x, torch.zeros(3), x)


# ------------------------------------------------------------------------------------------- aggregation


def test_aggregate_hand_values():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(aggregate(v, m, mode="token-mean")) == pytest.approx(10 / 4)
    assert float(aggregate(v, m, mode="seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(v, m, mode="seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    assert float(aggregate(v, m, mode="seq-mean-token-sum-norm")) == pytest.approx(10 / (2 * 3))
    assert float(aggregate(v, m, mode="token-mean", normalizer=5.0)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(v, m, mode="mean")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_with_normalizer_give_whole_batch_gradient(mode):
    g = torch.Generator().manual_seed(2)
    N, T = 8, 7
    logp0 = -torch.rand(N, T, generator=g)
    old = logp0 + 0.1 * torch.randn(N, T, generator=g)
    ref = logp0 + 0.1 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.3).float()
    mask[:, 0] = 1

    def loss_of(lp, sl):
        per_token, _ = policy_loss(lp[sl], old[sl], adv[sl], mask[sl], clip_high=0.3, dual_clip=3.0)
        return per_token + 0.01 * kl_penalty(lp[sl], ref[sl])

    whole = logp0.clone().requires_grad_()
    aggregate(loss_of(whole, slice(None)), mask, mode=mode).backward()

    parts = logp0.clone().requires_grad_()
    norm = loss_normalizer(mask, mode=mode, max_len=T)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 8)):
        aggregate(loss_of(parts, sl), mask[sl], mode=mode, normalizer=norm).backward()
    assert (whole.grad - parts.grad).abs().max() <= 1e-6, f"micro-batch gradient differs from whole batch ({mode})"


def test_loss_normalizer_constant_length_for_dr_grpo():
    m = torch.ones(3, 4)
    assert float(loss_normalizer(m, mode="seq-mean-token-sum-norm", max_len=64)) == 3 * 64
    m[2] = 0
    assert float(loss_normalizer(m, mode="seq-mean-token-mean")) == 2, "empty rows are not sequences"
    assert float(loss_normalizer(m, mode="token-mean")) == 8


# ------------------------------------------------------------------------------------------- DAPO and presets


def test_dynamic_sampling_keep():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, float("nan"), 0.5], [float("nan"), 1.0, 0.0]])
    assert dynamic_sampling_keep(r).tolist() == [False, True, False, True]


def test_overlong_penalty_hand_values():
    lengths = torch.tensor([10, 16, 18, 20, 25])
    p = overlong_penalty(lengths, max_len=20, buffer=4)
    torch.testing.assert_close(p, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_len=20, buffer=0)


def test_presets():
    assert set(ALGORITHMS) == {"grpo", "dapo", "dr_grpo", "gspo", "emo_r3"}
    g = get_algorithm("grpo")
    assert (g.clip_low, g.clip_high, g.dual_clip, g.kl_coef, g.kl_kind) == (0.2, 0.3, 3.0, 0.01, "k3")
    assert g.loss_agg == "token-mean" and g.adv_scale == "group" and not g.reflection
    e = get_algorithm("emo_r3")
    assert e.reflection and dataclasses.replace(e, reflection=False) == g, "emo_r3 is grpo plus RER, nothing else"
    d = get_algorithm("dapo")
    assert (d.clip_high, d.kl_coef, d.dynamic_sampling) == (0.28, 0.0, True) and d.overlong_buffer > 0
    assert get_algorithm("dr_grpo").adv_scale == "none"
    assert get_algorithm("dr_grpo").loss_agg == "seq-mean-token-sum-norm"
    s = get_algorithm("gspo")
    assert (s.ratio_level, s.clip_low, s.clip_high, s.loss_agg) == ("sequence", 3e-4, 4e-4, "seq-mean-token-mean")
    with pytest.raises(ValueError, match="dapo, dr_grpo, emo_r3, grpo, gspo"):
        get_algorithm("ppo")
