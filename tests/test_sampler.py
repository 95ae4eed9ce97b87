"""Tests for emor3.engine.sampler: the logit filters and the draw (pure functions), then ``sample`` on a tiny
Qwen2.5-VL-architecture model against transformers' ``generate`` and teacher-forced ``model.logprobs``.

Shapes: B prompts, G samples per prompt, N = B·G rows, T completion length, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from emor3.engine.sampler import Rollout, apply_banned, apply_top_k, apply_top_p, draw_tokens, filter_logits, sample
from emor3.models import QwenVL, QwenVLConfig
from emor3.models.positions import mrope_position_ids

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


def test_inverse_cdf_draw_matches_softmax_chi_square():
    # 8-token toy distribution, 200k draws at a fixed seed: a biased draw (an off-by-one in the search, a missing
    # max-shift, searching the unscaled uniform) moves the counts by tens of standard errors and fails decisively.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -4.0])  # (V,)
    probs = logits.softmax(-1).double()
    n = 200_000
    g = torch.Generator().manual_seed(1234)
    tokens, _ = draw_tokens(logits.expand(n, 8), torch.rand(n, generator=g))  # (N,)
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
    tokens, log_z = draw_tokens(filtered.expand(n, 8), torch.rand(n, generator=g))
    torch.testing.assert_close(log_z, filtered.logsumexp(-1).expand(n), msg="the draw's normaliser is not logsumexp")
    _, greedy_log_z = draw_tokens(filtered, None)
    torch.testing.assert_close(greedy_log_z, filtered.logsumexp(-1))
    kept = torch.isfinite(filtered[0])
    assert kept[tokens].all(), "a token outside the banned/top-k/top-p kept set was drawn"
    assert not (tokens == 1).any(), "a banned token was drawn"
    q = filtered[0][kept].softmax(-1).double()
    counts = torch.bincount(tokens, minlength=8)[kept].double()
    assert _chi_square_pvalue(counts, q) > 1e-3, "draws do not follow the renormalised truncated distribution"


def test_draw_edges_never_pick_filtered_tokens():
    # u at the extremes: 0 must give the first kept token, the largest float below 1 the last kept one, even when
    # filtered-out tokens sit before, between and after the kept ones
    filtered = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")]]).expand(3, 5)
    u = torch.tensor([0.0, 0.5, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()])
    assert draw_tokens(filtered, u)[0].tolist() == [1, 3, 3], "an edge uniform drew a filtered-out token"
    one_hot = torch.full((1, 5), float("-inf"))
    one_hot[0, 4] = 0.0
    assert draw_tokens(one_hot, torch.tensor([0.999999]))[0].tolist() == [4]


def test_greedy_draw_is_argmax_and_never_banned():
    logits = _random_logits(16, 32, seed=5)
    banned = torch.zeros(32, dtype=torch.bool)
    banned[logits.argmax(-1)[:4]] = True
    _, filtered = filter_logits(logits, temperature=0.0, banned_mask=banned)
    tok, _ = draw_tokens(filtered, None)
    ref = logits.masked_fill(banned, float("-inf")).argmax(-1)
    assert torch.equal(tok, ref), "greedy must be argmax over the non-banned tokens"


# ---------------------------------------------------------------------------------------------------------------
# sample() on a tiny Qwen2.5-VL-architecture model (fp32), against transformers and teacher forcing
# ---------------------------------------------------------------------------------------------------------------

IMG, VID, VSTART, VEND = 90, 91, 92, 93
VOCAB = 96
BANNED = (IMG, VID, VSTART, VEND)  # the vision specials, as Processor.banned_token_ids


def _hf_config():
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vis = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
               fullatt_block_indexes=[1], window_size=56)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vis, image_token_id=IMG, video_token_id=VID,
                                         vision_start_token_id=VSTART, vision_end_token_id=VEND,
                                         tie_word_embeddings=False)


def _hf_key(key: str) -> str:  # our published-layout names -> transformers 5.x module names
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "model." + key
    return key


@pytest.fixture(scope="module")
def models():
    hfc = _hf_config()
    ours = QwenVL(QwenVLConfig.from_dict(hfc.to_dict())).init_weights(0, std=0.1).eval()
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hfc).eval()
    missing, unexpected = hf.load_state_dict({_hf_key(k): v for k, v in ours.state_dict().items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, hf


@pytest.fixture(scope="module")
def batch():
    """Three left-padded prompts of different lengths: an 8x12-patch image, text only, two small images."""
    from emor3.models.processing import PromptBatch
    from test_models_parity import IMG as PARITY_IMG, mixed_batch

    assert PARITY_IMG == IMG, "the shared batch uses the same image token id"
    ids, am, grids, pix = mixed_batch()  # the rows the model parity tests use
    pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=IMG, spatial_merge_size=2)
    return PromptBatch(input_ids=ids, attention_mask=am, position_ids=pos, pixel_values=pix, image_grid_thw=grids,
                       next_position=nxt)


def _teacher_forced(model: QwenVL, batch, r: Rollout, temperature: float) -> torch.Tensor:
    """model.logprobs (the trainer's path) of the rollout's completions, (N, T)."""
    G = r.group_size
    N, T = r.completion_ids.shape
    ids = torch.cat([batch.input_ids.repeat_interleave(G, 0), r.completion_ids], 1)  # (N, P+T)
    am = torch.cat([batch.attention_mask.repeat_interleave(G, 0), r.completion_mask.long()], 1)  # (N, P+T)
    gen_pos = batch.next_position.repeat_interleave(G)[:, None] + torch.arange(T)  # (N, T)
    pos = torch.cat([batch.position_ids.repeat_interleave(G, 1), gen_pos[None].expand(3, N, T)], 2)  # (3, N, P+T)
    # image embeds are filled row-major, so each of a prompt's G rows needs its own copy in row order
    per_prompt = (batch.input_ids == IMG).sum(1).tolist()  # merged tokens per prompt
    chunks = model.encode_images(batch.pixel_values, batch.image_grid_thw).split(per_prompt)
    emb = torch.cat([c for c in chunks for _ in range(G)])  # (G·M, D)
    return model.logprobs(ids, pos, am, T, image_embeds=emb, temperature=temperature)


def test_greedy_matches_transformers_generate(models, batch):
    ours, hf = models
    stops = (3, 4)
    r = sample(ours, batch, group_size=2, max_new_tokens=12, temperature=0.0, stop_token_ids=stops,
               banned_token_ids=BANNED, generator=0)
    out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                      image_grid_thw=batch.image_grid_thw, max_new_tokens=12, do_sample=False,
                      # transformers 5.x only builds 3-D M-RoPE positions in generate when given the token types
                      # (its processor returns them); without them it silently uses 1-D text positions for images
                      mm_token_type_ids=(batch.input_ids == IMG).int(),
                      suppress_tokens=list(BANNED), eos_token_id=list(stops), pad_token_id=0,
                      )[:, batch.input_ids.shape[1]:]  # (B, <=12); greedy generate refuses num_return_sequences
    out = out.repeat_interleave(2, 0)  # (N, <=12): row n of ours samples prompt n // 2
    stop_hit = torch.isin(out, torch.tensor(stops))
    hf_len = torch.where(stop_hit.any(1), stop_hit.float().argmax(1) + 1, torch.full((out.shape[0],), out.shape[1]))
    assert torch.equal(r.lengths, hf_len), f"completion lengths {r.lengths.tolist()} vs transformers {hf_len.tolist()}"
    for n in range(out.shape[0]):
        k = int(hf_len[n])
        assert r.completion_ids[n, :k].tolist() == out[n, :k].tolist(), f"row {n}: greedy tokens differ from generate"
    assert torch.equal(r.completion_ids[0::2], r.completion_ids[1::2]), "greedy rows of one prompt must be equal"


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_teacher_forced(models, batch, temperature):
    ours, _ = models
    stops = tuple(range(3, 13))  # ten stop ids: some rows stop early, some run to the end
    r = sample(ours, batch, group_size=4, max_new_tokens=10, temperature=temperature, stop_token_ids=stops,
               banned_token_ids=BANNED, generator=3)
    lens = r.lengths
    if temperature > 0:
        assert (lens < 10).any() and r.truncated.any(), "test setup: need rows that stop early and rows that do not"
    ref = _teacher_forced(ours, batch, r, temperature if temperature > 0 else 1.0)  # T=0 records at T=1
    m = r.completion_mask
    err = ((ref - r.logprobs) * m).abs().max()
    assert err < 1e-5, f"sampler log-probs differ from teacher-forced model.logprobs by {err:.2e}: ratio != 1"
    assert (r.logprobs[m == 0] == 0).all(), "masked positions must carry log-prob 0"
    assert r.logprobs.dtype == torch.float32



@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_compacting_finished_rows_keeps_tokens_and_logprobs(models, batch, monkeypatch, temperature):
    """Dropping finished rows from the decode batch (power-of-two sizes, at the periodic check) changes which rows
    are computed together, never what a row samples: same tokens, masks and log-probs as the uncompacted batch.
    (Eager only: the compiled step runs the same loop, and compiling its four batch sizes takes a minute here.)"""
    ours, _ = models
    sizes = []
    fwd = type(ours).forward

    def recording_forward(self, input_ids, *a, **k):
        if input_ids.shape[1] == 1:
            sizes.append(input_ids.shape[0])
        return fwd(self, input_ids, *a, **k)

    kw = dict(group_size=4, max_new_tokens=24, temperature=temperature, stop_token_ids=tuple(range(3, 13)),
              banned_token_ids=BANNED, generator=5, check_every=2)
    monkeypatch.setattr(type(ours), "forward", recording_forward)
    full = sample(ours, batch, compact_finished=False, **kw)
    assert set(sizes) == {12}, "without compaction every decode step runs all 12 rows"
    sizes.clear()
    comp = sample(ours, batch, **kw)
    N = 12
    assert min(sizes) < N and all(n == N or n & (n - 1) == 0 for n in sizes), \
        f"test setup: compaction must happen, to powers of two (decode batch sizes {sorted(set(sizes))})"
    assert sizes == sorted(sizes, reverse=True), "the decode batch only shrinks"
    assert torch.equal(comp.completion_ids, full.completion_ids), "compaction changed the sampled tokens"
    assert torch.equal(comp.completion_mask, full.completion_mask) and torch.equal(comp.truncated, full.truncated)
    gap = (comp.logprobs - full.logprobs).abs().max()
    assert gap <= 1e-5, f"compaction changed the recorded log-probs by {gap:.1e}"

def test_image_encoded_once_and_prefill_once_per_prompt(models, batch, monkeypatch):
    ours, _ = models
    calls = {"encode": 0, "prefill_rows": []}
    enc, fwd = ours.encode_images, type(ours).forward

    def counting_encode(*a, **k):
        calls["encode"] += 1
        return enc(*a, **k)

    def recording_forward(self, input_ids, *a, **k):
        if input_ids.shape[1] > 1:
            calls["prefill_rows"].append(input_ids.shape[0])
        return fwd(self, input_ids, *a, **k)

    monkeypatch.setattr(ours, "encode_images", counting_encode)
    monkeypatch.setattr(type(ours), "forward", recording_forward)
    r = sample(ours, batch, group_size=5, max_new_tokens=3, generator=0, banned_token_ids=BANNED)
    assert calls["encode"] == 1, "images must be encoded once per rollout, not once per sample"
    assert calls["prefill_rows"] == [3], f"prefill must run once over the B=3 prompts, got {calls['prefill_rows']}"
    assert r.completion_ids.shape == (15, 3) and r.prompt_index.tolist() == [i // 5 for i in range(15)]


def test_seeded_runs_repeat_and_seeds_differ(models, batch):
    ours, _ = models
    kw = dict(group_size=4, max_new_tokens=8, temperature=1.0, top_p=0.95, banned_token_ids=BANNED)
    a = sample(ours, batch, generator=11, **kw)
    b = sample(ours, batch, generator=torch.Generator().manual_seed(11), **kw)
    c = sample(ours, batch, generator=12, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs), \
        "the same seed must give the same rollout (int seed and Generator alike)"
    assert not torch.equal(a.completion_ids, c.completion_ids), "different seeds gave identical rollouts"
    assert not torch.equal(a.completion_ids[0::4], a.completion_ids[1::4]), "the G rows of a prompt must differ"


def test_masks_with_several_stop_ids_against_naive_loop(models, batch):
    ours, _ = models
    kw = dict(group_size=4, max_new_tokens=16, temperature=1.0, banned_token_ids=BANNED, generator=5)
    free = sample(ours, batch, **kw)  # no stop ids: every row runs to 16 tokens
    assert free.truncated.all() and free.completion_mask.all()
    # stop ids taken from the free run (row 0 at step 2, row 5 at step 6), so some rows stop, at known places
    stops = sorted({int(free.completion_ids[0, 2]), int(free.completion_ids[5, 6])})
    r = sample(ours, batch, stop_token_ids=stops, pad_token_id=0, **kw)
    N, T = r.completion_ids.shape
    lens = []
    for n in range(N):  # naive reference: scan the free run for the first stop token
        row = free.completion_ids[n].tolist()
        k = next((i + 1 for i, tok in enumerate(row) if tok in stops), len(row))
        lens.append(k)
        assert r.completion_ids[n, :k].tolist() == row[:k], f"row {n}: tokens before the stop changed"
        assert r.completion_mask[n].tolist() == [1.0] * k + [0.0] * (T - k), f"row {n}: mask wrong (stop at {k})"
        assert (r.completion_ids[n, k:] == 0).all(), f"row {n}: tokens after the stop must be pad"
        assert bool(r.truncated[n]) == (not any(tok in stops for tok in row)), f"row {n}: truncated flag wrong"
    assert T == max(lens), "the rollout must be trimmed to its longest row"
    assert min(lens) <= 3 and r.truncated.any(), "test setup: need an early stop and a truncated row"
    assert torch.equal(r.logprobs[:, :T] * r.completion_mask, free.logprobs[:, :T] * r.completion_mask)


def test_banned_never_sampled_and_top_k_top_p_stay_in_kept_set(models, batch):
    ours, _ = models
    banned = tuple(range(40, 90)) + BANNED  # more than half the vocabulary
    r = sample(ours, batch, group_size=8, max_new_tokens=8, temperature=1.3, top_k=7, top_p=0.8,
               banned_token_ids=banned, generator=9)
    assert not torch.isin(r.completion_ids, torch.tensor(banned)).any(), "a banned token was sampled"
    # recompute each step's distribution by teacher forcing and check every token is in its kept set
    G = r.group_size
    N, T = r.completion_ids.shape
    ids = torch.cat([batch.input_ids.repeat_interleave(G, 0), r.completion_ids], 1)
    am = torch.cat([batch.attention_mask.repeat_interleave(G, 0), torch.ones(N, T, dtype=torch.long)], 1)
    gen_pos = batch.next_position.repeat_interleave(G)[:, None] + torch.arange(T)
    pos = torch.cat([batch.position_ids.repeat_interleave(G, 1), gen_pos[None].expand(3, N, T)], 2)
    chunks = ours.encode_images(batch.pixel_values, batch.image_grid_thw).split((batch.input_ids == IMG).sum(1).tolist())
    emb = torch.cat([c for c in chunks for _ in range(G)])
    with torch.no_grad():
        logits = ours.logits(ours(ids, pos, am, image_embeds=emb))[:, -T - 1:-1].float()  # (N, T, V)
    banned_mask = torch.zeros(VOCAB, dtype=torch.bool)
    banned_mask[list(banned)] = True
    _, filtered = filter_logits(logits.reshape(N * T, VOCAB), temperature=1.3, top_k=7, top_p=0.8,
                                     banned_mask=banned_mask)
    kept = torch.isfinite(filtered).view(N, T, VOCAB).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    assert kept.all(), "sample emitted a token outside the top-k / top-p kept set"


def test_graph_decode_needs_cuda(models, batch):
    with pytest.raises(ValueError, match="compile='graph' captures CUDA graphs; the batch is on cpu"):
        sample(models[0], batch, group_size=1, max_new_tokens=2, compile="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on the GPU machine)")
def test_graph_decode_matches_eager_on_cuda(models, batch):
    """The CUDA-graph step replays eager's own kernels: the same tokens, and log-probs to rounding (it attends over
    the whole static cache, eager over the written prefix). Stop tokens finish rows at different steps, so the
    batch is compacted and captured again mid-rollout; top-p runs inside the graph (a sort on the device)."""
    ours = models[0].to("cuda")
    try:
        cuda_batch = batch.to("cuda")
        kw = dict(group_size=4, max_new_tokens=48, temperature=1.0, top_p=0.9, banned_token_ids=BANNED, generator=5,
                  stop_token_ids=(7, 11, 13), check_every=4)
        eager = sample(ours, cuda_batch, **kw)
        graph = sample(ours, cuda_batch, compile="graph", **kw)
        assert eager.completion_mask.sum(-1).unique().numel() > 2, "test setup: rows must finish at different steps"
        assert torch.equal(eager.completion_ids, graph.completion_ids), "the CUDA graph changed the tokens"
        assert torch.equal(eager.completion_mask, graph.completion_mask)
        assert torch.allclose(eager.logprobs, graph.logprobs, atol=1e-5, rtol=0)
    finally:
        models[0].to("cpu")


def test_compiled_decode_step_traces_once_and_matches_eager(models, batch):
    from torch._dynamo.utils import counters

    ours, _ = models
    # 40 tokens after a 31-token prompt: eager decoding grows its attended cache prefix past 64 slots mid-rollout,
    # compiled decoding attends over the whole static cache; both must give the same tokens and exact log-probs
    kw = dict(group_size=2, max_new_tokens=40, temperature=1.0, banned_token_ids=BANNED, generator=4)
    counters.clear()
    eager = sample(ours, batch, **kw)
    assert batch.input_ids.shape[1] + 40 > 64, "test setup: the rollout must cross an eager window boundary"
    err = (_teacher_forced(ours, batch, eager, 1.0) - eager.logprobs).abs().max()
    assert err < 1e-5, f"log-probs wrong after the eager cache window grew ({err:.2e})"
    # backend "eager": dynamo traces exactly as it does for inductor but runs the traced graph with aten kernels, so
    # the test stays fast (inductor's C++ codegen takes ~10-30 s here; the benchmark runs it). Traced graphs may
    # reassociate float ops, so log-probs agree to rounding, tokens exactly.
    compiled = sample(ours, batch, compile="eager", **kw)
    assert torch.equal(eager.completion_ids, compiled.completion_ids), "compiled decode step changed the tokens"
    assert torch.allclose(eager.logprobs, compiled.logprobs, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1, "decode step recompiled across steps (shapes must be static)"
    assert not counters["graph_break"], f"decode step has graph breaks: {dict(counters['graph_break'])}"


def test_bad_arguments_raise_with_reason(models, batch):
    ours, _ = models
    with pytest.raises(ValueError, match="also banned"):
        sample(ours, batch, group_size=1, max_new_tokens=2, stop_token_ids=[IMG], banned_token_ids=BANNED)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(ours, batch, group_size=1, max_new_tokens=2, stop_token_ids=[VOCAB])
    with pytest.raises(ValueError, match="top_p"):
        sample(ours, batch, group_size=1, max_new_tokens=2, top_p=0.0)


def test_tiny_checkpoint_with_processor_texts_and_transformers_from_pretrained(tmp_path):
    """The real path: an offline tiny checkpoint folder, emor3's Processor, and transformers loading the same
    folder with from_pretrained; greedy tokens must agree and texts must be the masked tokens, specials skipped."""
    from PIL import Image

    from emor3.engine.sampler import _decode_texts
    from emor3.models.checkpoint import load_pretrained
    from emor3.models.processing import Processor
    from emor3.toy.model import build_tiny_checkpoint

    corpus = ["Step 1: the scene is bright. Step 2: she smiles. Step 3: joy. \\boxed{joy}",
              "sadness anger fear surprise disgust contentment amusement awe excitement"] * 20
    build_tiny_checkpoint(tmp_path, corpus, name="tiny", seed=0, vocab_size=400)
    proc = Processor.from_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.float32).eval()
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How does she feel?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "Name an emotion."}]}]]
    batch = proc.encode_prompts(msgs, [[Image.new("RGB", (112, 84), (200, 30, 30))], []])
    r = sample(model, batch, group_size=1, max_new_tokens=10, temperature=0.0, stop_token_ids=proc.stop_token_ids,
               banned_token_ids=proc.banned_token_ids, tokenizer=proc, generator=0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    image_id = model.config.image_token_id
    out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                      image_grid_thw=batch.image_grid_thw, mm_token_type_ids=(batch.input_ids == image_id).int(),
                      max_new_tokens=10, do_sample=False, suppress_tokens=list(proc.banned_token_ids),
                      eos_token_id=list(proc.stop_token_ids), pad_token_id=proc.pad_token_id)
    out = out[:, batch.input_ids.shape[1]:]
    for n in range(2):
        k = int(r.lengths[n])
        assert r.completion_ids[n, :k].tolist() == out[n, :k].tolist(), f"row {n}: greedy differs from generate"
        want = proc.tokenizer.decode(r.completion_ids[n, :k].tolist(), skip_special_tokens=True)
        assert r.texts[n] == want, f"row {n}: text is not the decoded masked completion"
    # decoding stops at the mask and drops special tokens (the stop token itself is special)
    tok = proc.tokenizer
    words = tok("joy", add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([words + [im_end] + words])  # (1, 2·w + 1): a stop, then tokens that must not appear
    assert _decode_texts(proc, ids, torch.tensor([len(words) + 1])) == ["joy"], "texts must skip specials and stop"
