"""Tests for emor3.grpo.sampler: the logit filters and the draw (pure functions), then ``sample`` on a tiny
Qwen2.5-VL-architecture model against transformers' ``generate`` and teacher-forced ``model.logprobs``.

Shapes: B prompts, G samples per prompt, N = B·G rows, T completion length, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from emor3.grpo.sampler import apply_banned, apply_top_k, apply_top_p, draw_tokens, filter_logits

# ---------------------------------------------------------------------------------------------------------------
# Pure functions: filters and the exponential-race draw
# ---------------------------------------------------------------------------------------------------------------


def _random_logits(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 3.0  # (N, V), peaked enough that top-p keeps varying set sizes


@pytest.mark.parametrize("top_k", [1, 3, 17, 64])
def test_top_k_matches_transformers(top_k):
    logits = _random_logits(32, 64, seed=1)  # (N, V)
    ours = apply_top_k(logits, top_k)
    ref = TopKLogitsWarper(top_k)(None, logits.clone())
    assert torch.equal(ours, ref), "top-k keeps a different token set than transformers' TopKLogitsWarper"
    assert ((ours > float("-inf")).sum(-1) == min(top_k, 64)).all(), "top-k must keep exactly k tokens (no ties here)"


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers_and_is_minimal(top_p):
    logits = _random_logits(32, 64, seed=2)  # (N, V)
    ours = apply_top_p(logits, top_p)
    ref = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(ours.isinf(), ref.isinf()), "top-p keeps a different token set than TopPLogitsWarper"
    # the kept set is the smallest prefix of the sorted distribution with mass >= top_p
    probs = logits.softmax(-1)
    kept = ours > float("-inf")
    kept_mass = (probs * kept).sum(-1)  # (N,)
    assert (kept_mass >= top_p - 1e-6).all(), "top-p dropped so much that the kept mass is below top_p"
    smallest_kept = torch.where(kept, probs, torch.ones_like(probs)).min(-1).values  # (N,)
    assert (kept_mass - smallest_kept < top_p + 1e-6).all(), "top-p kept a token that was not needed to reach top_p"
    assert kept.gather(-1, probs.argmax(-1, keepdim=True)).all(), "top-p must always keep the most likely token"


def test_filters_are_identity_when_disabled_and_banned_is_minus_inf():
    logits = _random_logits(4, 16, seed=3)
    assert torch.equal(apply_top_k(logits, 0), logits) and torch.equal(apply_top_p(logits, 1.0), logits)
    banned = torch.zeros(16, dtype=torch.bool)
    banned[[2, 5]] = True
    out = apply_banned(logits, banned)
    assert out[:, [2, 5]].eq(float("-inf")).all() and torch.equal(out[:, ~banned], logits[:, ~banned])


def test_filter_logits_order_bans_before_top_k():
    # token 0 is by far the most likely and banned: top-k=1 must then keep the second best, not nothing
    logits = torch.tensor([[10.0, 2.0, 1.0, 0.0]])
    banned = torch.tensor([True, False, False, False])
    scaled, filtered = filter_logits(logits, temperature=0.5, top_k=1, banned_mask=banned)
    assert torch.equal(scaled, logits / 0.5), "the recorded distribution must be logits / temperature, unfiltered"
    assert torch.isfinite(filtered).tolist() == [[False, True, False, False]], "banning must happen before top-k"


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; p-value from the regularised upper incomplete gamma function."""
    n = counts.sum()
    expected = probs * n
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat.double() / 2.0))


def test_exponential_race_matches_softmax_chi_square():
    # 8-token toy distribution, 200k draws at a fixed seed: a biased draw (e.g. argmax(p / E) written as
    # argmax(p * E), or log of noise dropped) moves the counts by tens of standard errors and fails decisively.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -4.0])  # (V,)
    probs = logits.softmax(-1).double()
    n = 200_000
    g = torch.Generator().manual_seed(1234)
    noise = torch.empty(n, 8).exponential_(generator=g)  # (N, V)
    tokens = draw_tokens(logits.expand(n, 8), noise)  # (N,)
    counts = torch.bincount(tokens, minlength=8).double()
    p_value = _chi_square_pvalue(counts, probs)
    assert p_value > 1e-3, f"sampled frequencies {counts / n} do not follow softmax {probs} (chi-square p={p_value:.2e})"
    # and the test has power: the same draws judged against a slightly wrong distribution are rejected
    wrong = (logits * 1.1).softmax(-1).double()
    assert _chi_square_pvalue(counts, wrong) < 1e-6, "chi-square test too weak to catch a 10% temperature error"


def test_truncated_draws_stay_in_kept_set_and_follow_renormalised_probs():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]])
    banned = torch.zeros(8, dtype=torch.bool)
    banned[1] = True
    _, filtered = filter_logits(logits, temperature=0.8, top_k=5, top_p=0.9, banned_mask=banned)
    n = 100_000
    g = torch.Generator().manual_seed(7)
    tokens = draw_tokens(filtered.expand(n, 8), torch.empty(n, 8).exponential_(generator=g))
    kept = torch.isfinite(filtered[0])
    assert kept[tokens].all(), "a token outside the banned/top-k/top-p kept set was drawn"
    assert not (tokens == 1).any(), "a banned token was drawn"
    q = filtered[0][kept].softmax(-1).double()
    counts = torch.bincount(tokens, minlength=8)[kept].double()
    assert _chi_square_pvalue(counts, q) > 1e-3, "draws do not follow the renormalised truncated distribution"


def test_greedy_draw_is_argmax_and_never_banned():
    logits = _random_logits(16, 32, seed=5)
    banned = torch.zeros(32, dtype=torch.bool)
    banned[logits.argmax(-1)[:4]] = True
    _, filtered = filter_logits(logits, temperature=0.0, banned_mask=banned)
    tok = draw_tokens(filtered, None)
    ref = logits.masked_fill(banned, float("-inf")).argmax(-1)
    assert torch.equal(tok, ref), "greedy must be argmax over the non-banned tokens"
