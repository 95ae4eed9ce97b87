"""Parity of emor3.models.QwenVL with transformers' Qwen2VLForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration holding the same weights (tiny random configs, fp32, CPU).

Covered: logits on a left-padded batch mixing a one-image row, a text-only row and a two-image row, with non-square
images larger than one Qwen2.5-VL window; M-RoPE position ids vs `get_rope_index`; gradients of a scalar loss for
every parameter; KV-cache decoding vs the full forward; chunked `logprobs` (and entropy) vs a naive full
log-softmax at temperature 1 and 0.7; gradient checkpointing and freeze_vision.
"""

import pytest
import torch
import transformers
from hf_reference import internals

from emor3.models import QwenVL, QwenVLConfig
from emor3.models.positions import decode_position_ids, mrope_position_ids

IMG, VSTART, VEND = 90, 92, 93
V = 96


def tiny_hf_config(model_type: str, tie: bool):
    text = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    ids = dict(image_token_id=IMG, video_token_id=91, vision_start_token_id=VSTART, vision_end_token_id=VEND,
               tie_word_embeddings=tie)
    if model_type == "qwen2_5_vl":
        # window 56 px = 2x2 merged tokens: the 8x12-patch image spans 2x3 windows, edge windows included
        vis = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=[1], window_size=56)
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **ids)
    vis = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vis, **ids)


def hf_key(ours_key: str) -> str:
    if ours_key.startswith("model."):
        return "model.language_model." + ours_key[len("model."):]
    if ours_key.startswith("visual."):
        return "model." + ours_key
    return ours_key


def make_pair(model_type: str, tie: bool, seed: int = 0):
    hfc = tiny_hf_config(model_type, tie)
    cfg = QwenVLConfig.from_dict(hfc.to_dict())
    torch.manual_seed(seed)
    ours = QwenVL(cfg).init_weights(seed, std=0.1).eval()
    cls = (transformers.Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl"
           else transformers.Qwen2VLForConditionalGeneration)
    hf = cls(hfc).eval()
    sd = {hf_key(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set()), (missing, unexpected)
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    return ours, hf


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded with 0 to the longest: input ids (N, L) and attention mask (N, L)."""
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)  # (N, L)
    am = torch.zeros(len(rows), L, dtype=torch.long)  # (N, L)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        am[i, L - len(r):] = 1
    return ids, am


def mixed_batch(patch_dim: int = 3 * 2 * 14 * 14):
    """Rows: [img 8x12 patches] text; text only (left-padded most); [img 4x4] text [img 6x4] text. ``patch_dim``:
    C * t * p * p of the model's patches (14-px for Qwen2/2.5-VL, 16-px for Qwen3-VL)."""
    grids = torch.tensor([[1, 8, 12], [1, 4, 4], [1, 6, 4]])  # patches; merged tokens 24, 4, 6

    def img(k):
        return [VSTART] + [IMG] * k + [VEND]

    rows = [[5, 6] + img(24) + [7, 8, 9], [10, 11, 12, 13], [14] + img(4) + [15] + img(6) + [16, 17]]
    ids, am = left_pad(rows)
    g = torch.Generator().manual_seed(1)
    pix = torch.randn(int(grids.prod(-1).sum()), patch_dim, generator=g)  # (patches, C*t*p*p)
    return ids, am, grids, pix


CASES = [("qwen2_5_vl", False), ("qwen2_vl", True)]


@pytest.mark.parametrize("model_type,tie", CASES)
def test_positions_match_transformers_rope_index(model_type, tie):
    ours, hf = make_pair(model_type, tie)
    ids, am, grids, _ = mixed_batch()
    pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=IMG, spatial_merge_size=2)
    with internals("get_rope_index's arguments"):
        ref, deltas = hf.model.get_rope_index(ids, (ids == IMG).int(), grids, attention_mask=am)
    assert torch.equal(pos * am, ref * am), "M-RoPE ids differ from transformers on real tokens"
    # decoding continues at max id + 1 on all axes == transformers' rope_deltas rule (position = seq idx + delta)
    assert torch.equal(nxt, am.sum(1) + deltas.squeeze(1)), "next_position disagrees with rope_deltas"


@pytest.mark.parametrize("model_type,tie", CASES)
def test_logits_and_grad_parity(model_type, tie):
    ours, hf = make_pair(model_type, tie)
    ids, am, grids, pix = mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    ref = hf(input_ids=ids, attention_mask=am, position_ids=pos, pixel_values=pix, image_grid_thw=grids).logits
    emb = ours.encode_images(pix, grids)
    out = ours.logits(ours(ids, pos, am, image_embeds=emb))
    valid = am.bool()
    scale = ref[valid].abs().max()
    err = (ref - out)[valid].abs().max() / scale.clamp(min=1)
    assert err < 1e-4, f"logits differ from transformers by {err:.2e} (scale {scale:.2f})"
    # gradient of one scalar loss, every parameter (padding positions excluded: their values are unused)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    (ref * w)[valid].sum().backward()
    (out * w)[valid].sum().backward()
    hf_params = dict(hf.named_parameters())
    n_checked = 0
    for name, p in ours.named_parameters():
        q = hf_params[hf_key(name)]
        assert p.grad is not None and q.grad is not None, f"no gradient for {name}"
        gs = q.grad.abs().max().clamp(min=1e-6)
        gerr = (p.grad - q.grad).abs().max() / gs
        assert gerr < 1e-3, f"gradient of {name} differs from transformers (rel {gerr:.2e})"
        n_checked += 1
    assert n_checked == len(list(ours.parameters()))


@pytest.mark.parametrize("model_type,tie", CASES)
def test_cached_decoding_matches_full_forward(model_type, tie):
    """Prefill the prompt once, copy its cache to G rows, decode a continuation token by token: the logits
    must equal one full forward over prompt + continuation (guards cache writes, masks and decode positions)."""
    ours, _ = make_pair(model_type, tie)
    ids, am, grids, pix = mixed_batch()
    N, P = ids.shape
    G, T = 2, 4
    pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    emb = ours.encode_images(pix, grids)
    cont = torch.randint(0, 80, (N * G, T), generator=torch.Generator().manual_seed(3))  # (N*G, T)
    with torch.no_grad():
        cache = ours.new_cache(N, P + T)
        am_c = torch.cat([am, torch.ones(N, T, dtype=torch.long)], 1)  # (N, S)
        h = ours(ids, pos, am_c, image_embeds=emb, cache=cache, cache_position=torch.arange(P))
        cache = cache.repeat_interleave(G)
        am_g = am_c.repeat_interleave(G, 0)
        nxt_g = nxt.repeat_interleave(G)
        steps = [ours.logits(h[:, -1:]).repeat_interleave(G, 0)]
        for t in range(T - 1):
            hs = ours(cont[:, t:t + 1], decode_position_ids(nxt_g, t), am_g, cache=cache,
                      cache_position=torch.tensor([P + t]))
            steps.append(ours.logits(hs))
        inc = torch.cat(steps, 1)  # (N*G, T, V)
        # full forward over the concatenation; image embeds repeated per row
        full_ids = torch.cat([ids.repeat_interleave(G, 0), cont], 1)
        full_pos = torch.cat([pos.repeat_interleave(G, 1), decode_position_ids(nxt_g, 0, T)], 2)
        img_counts = (ids == IMG).sum(1).tolist()
        per_row = torch.split(emb, img_counts)
        emb_g = torch.cat([per_row[i] for i in range(N) for _ in range(G)])
        full = ours.logits(ours(full_ids, full_pos, am_g, image_embeds=emb_g))[:, P - 1:P + T - 1]
    assert (inc - full).abs().max() < 1e-4 * full.abs().max().clamp(min=1), "cached decode != full forward"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_naive_full_log_softmax(temperature):
    ours, _ = make_pair("qwen2_5_vl", False)
    ids, am, grids, pix = mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    T = 3
    emb = ours.encode_images(pix, grids)
    lp, ent = ours.logprobs(ids, pos, am, T, image_embeds=emb, temperature=temperature, chunk_size=4,
                            return_entropy=True)
    logits = ours.logits(ours(ids, pos, am, image_embeds=emb)).float() / temperature
    full = torch.log_softmax(logits, -1)[:, -T - 1:-1]  # (N, T, V)
    ref = full.gather(-1, ids[:, -T:, None]).squeeze(-1)
    ref_ent = -(full.exp() * full).sum(-1)
    assert lp.dtype == torch.float32 and lp.shape == (3, T)
    assert torch.allclose(lp, ref, atol=1e-5), "chunked log-probs differ from full log_softmax gather"
    assert torch.allclose(ent, ref_ent, atol=1e-5), "entropy differs from -sum p log p"
    # gradients through the chunk recomputation equal the naive ones
    # hand-written chunk backward == autograd through the naive path, for log-probs and entropy, for the head
    # weight and (through the hidden states) the last decoder layer
    mix = torch.randn(lp.shape, generator=torch.Generator().manual_seed(4))
    params = [ours.lm_head.weight, ours.model.layers[-1].mlp.down_proj.weight]
    g1 = torch.autograd.grad((lp * mix).sum() + 0.3 * ent.sum(), params)
    g2 = torch.autograd.grad((ref * mix).sum() + 0.3 * ref_ent.sum(), params)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5), "chunked log-prob/entropy backward gives a different gradient"


def test_gradient_checkpointing_and_freeze_vision():
    ours, _ = make_pair("qwen2_5_vl", False)
    ids, am, grids, pix = mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    blocks = list(ours.model.layers) + list(ours.visual.blocks)
    calls = [0] * len(blocks)
    for i, blk in enumerate(blocks):  # count the forward passes that start in every decoder layer and vision block
        # (a pre-hook: checkpoint's recomputation stops once it has what backward needs, before forward hooks run)
        blk.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    def grads():
        ours.zero_grad()
        calls[:] = [0] * len(blocks)
        lp = ours.logprobs(ids, pos, am, 3, image_embeds=ours.encode_images(pix, grids))
        lp.sum().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    ours.train()
    plain = grads()
    assert calls == [1] * len(blocks), f"without checkpointing each block runs once: {calls}"
    ours.set_gradient_checkpointing(True)
    ck = grads()
    # checkpointing keeps only each block's input and reruns the block in backward: twice per block, every block
    assert calls == [2] * len(blocks), f"set_gradient_checkpointing did not recompute every block: {calls}"
    assert plain.keys() == ck.keys()
    for n in plain:
        assert torch.allclose(plain[n], ck[n], atol=1e-6), f"checkpointing changed the gradient of {n}"
    ours.freeze_vision()
    frozen = grads()
    assert not any(n.startswith("visual.") for n in frozen), "frozen vision tower still receives gradients"
    assert any(n.startswith("model.layers.") for n in frozen)
