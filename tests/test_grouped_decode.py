"""Shared-prefix ("grouped") decode: the G rows of a prompt read its cache once (`GroupedKVCache`).

Not bit-exact against the per-row cache and SDPA (the attention sums run in another order), so the checks are:
- one attention call against SDPA over the same keys copied to every row, within a tolerance derived from fp32
  rounding of sums of P + W terms;
- whole rollouts against the default decode: greedy tokens equal and log-probs within 1e-5, with and without
  compaction (which copies the grouped cache out to rows mid-rollout); sampled log-probs equal to the trainer's
  teacher-forced ones within the 1e-5 the default path is held to.
"""

import pytest
import torch
import torch.nn.functional as F
from test_sampler import BANNED, _teacher_forced, batch, models  # noqa: F401  (fixtures)

from emor3.engine.sampler import sample
from emor3.models.qwen_vl import GroupedKVCache, KVCache

STOPS = tuple(range(3, 13))


@pytest.mark.parametrize("flash", [True, False])  # the CPU's two flash calls merged by lse; one softmax elsewhere
def test_grouped_attention_matches_sdpa_over_copied_cache(flash):
    gen = torch.Generator().manual_seed(0)
    layers, B, G, K, H, P, W, hd = 2, 3, 4, 2, 4, 17, 9, 8
    N = B * G
    pk, pv = torch.randn(layers, B, K, P, hd, generator=gen), torch.randn(layers, B, K, P, hd, generator=gen)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :5] = 0  # left padding of different lengths
    prompt_mask[2, :2] = 0
    cache = GroupedKVCache.from_prefill(KVCache(pk, pv), prompt_mask, P, G, W)
    t = 5  # generated slots 0..4 written before, this token at slot 5
    cache.k[:, :, :, :t] = torch.randn(layers, N, K, t, hd, generator=gen)
    cache.v[:, :, :, :t] = torch.randn(layers, N, K, t, hd, generator=gen)
    q = torch.randn(N, H, 1, hd, generator=gen)
    k, v = torch.randn(N, K, 1, hd, generator=gen), torch.randn(N, K, 1, hd, generator=gen)
    # a step attends over the own slots written so far, this token's included: 0..t
    out = cache.window(t + 1).attend(1, q, k, v, torch.tensor([P + t]), flash=flash)  # (N, H, 1, hd)

    full = cache.materialize(P + W)  # the rows' own copies, this token's k, v included (written by attend)
    assert torch.equal(full.k[1, :, :, P + t], k[:, :, 0]), "attend must write the token's keys at its slot"
    mask = torch.cat([prompt_mask.repeat_interleave(G, 0).bool(), torch.arange(W)[None].expand(N, W) <= t], 1)
    ref = F.scaled_dot_product_attention(q, full.k[1], full.v[1], attn_mask=mask[:, None, None, :], enable_gqa=True)
    # each output is a convex combination of P + W values: a different summation order moves it by at most
    # ~(P + W) roundings of size eps * max|v|, plus the softmax's own
    tol = 4 * (P + W) * torch.finfo(torch.float32).eps * float(full.v[1].abs().max())
    err = float((out - ref).abs().max())
    assert err <= tol, f"grouped attention differs from SDPA over the copied cache by {err:.2e} > {tol:.2e}"


@pytest.mark.parametrize("check_every", [32, 2])  # 32: no check within 20 tokens; 2: compaction copies it out
def test_greedy_rollout_equals_default_decode(models, batch, check_every, monkeypatch):
    ours, _ = models
    copied = []
    orig = GroupedKVCache.materialize
    monkeypatch.setattr(GroupedKVCache, "materialize", lambda self, *a: copied.append(1) or orig(self, *a))
    kw = dict(group_size=4, max_new_tokens=20, temperature=0.0, stop_token_ids=STOPS, banned_token_ids=BANNED,
              generator=1, check_every=check_every)
    ref = sample(ours, batch, **kw)
    got = sample(ours, batch, shared_prefix_decode=True, **kw)
    assert bool(copied) == (check_every == 2), "test setup: compaction (and only it) copies the grouped cache out"
    assert torch.equal(got.completion_ids, ref.completion_ids), "grouped decode changed greedy tokens"
    assert torch.equal(got.completion_mask, ref.completion_mask)
    gap = float((got.logprobs - ref.logprobs).abs().max())
    assert gap <= 1e-5, f"grouped decode moved recorded log-probs by {gap:.1e}"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forced(models, batch, temperature):
    ours, _ = models
    r = sample(ours, batch, group_size=4, max_new_tokens=10, temperature=temperature, stop_token_ids=STOPS,
               banned_token_ids=BANNED, generator=3, shared_prefix_decode=True)
    ref = _teacher_forced(ours, batch, r, temperature)
    err = float(((ref.detach() - r.logprobs) * r.completion_mask).abs().max())
    assert err < 1e-5, f"grouped-decode log-probs differ from teacher-forced model.logprobs by {err:.2e}"


def test_group_of_one_and_compiled_use_the_default_cache(models, batch, monkeypatch):
    ours, _ = models
    seen = []
    orig = GroupedKVCache.attend
    monkeypatch.setattr(GroupedKVCache, "attend", lambda self, *a: seen.append(1) or orig(self, *a))
    sample(ours, batch, group_size=1, max_new_tokens=3, temperature=1.0, generator=0, shared_prefix_decode=True)
    assert not seen, "G = 1 has nothing to share: the plain cache is used"
    sample(ours, batch, group_size=2, max_new_tokens=3, temperature=1.0, generator=0, shared_prefix_decode=True)
    assert seen, "G > 1 with shared_prefix_decode must decode through the grouped cache"
