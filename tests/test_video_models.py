"""Video input in emor3's own Qwen2-VL / Qwen2.5-VL / Qwen3-VL against transformers 5.24 holding the same weights
(tiny random configs, fp32, CPU): clips as `pixel_values_videos` + `video_grid_thw` through the vision tower
(temporal patches of two frames), M-RoPE ids vs `get_rope_index` (Qwen2.5-VL's absolute time from
`second_per_grid_ts` x `tokens_per_second`, Qwen3-VL's one grid per frame between timestamp texts), and logits and
completion log-probs on a video-only batch and on a left-padded batch mixing a clip row, an image + clip row and a
text-only row. transformers computes its own position ids here (from `mm_token_type_ids`), so the ids and the
model are checked together.
"""

import pytest
import torch
import transformers
from hf_reference import internals

from emor3.models import QwenVL, QwenVLConfig, parse_config, Qwen3VL
from emor3.models.positions import decode_position_ids, mrope_position_ids, video_rope_grids
from test_models_parity import hf_key, left_pad, tiny_hf_config as qwen2_hf_config
from test_qwen3_vl import tiny_hf_config as qwen3_hf_config

IMG, VID, VSTART, VEND = 90, 91, 92, 93
TPS = 2  # Qwen2.5-VL tokens_per_second of the test config
# seconds per temporal patch of each clip: steps 1.5 and 5 temporal ids per patch, so ids are floor(ti * step),
# some past max(h', w') (where transformers 5.x and 4.x place the following text differently)
SECONDS = [0.75, 2.5]
VIDEO_GRIDS = [[4, 4, 6], [2, 6, 4]]  # (t, h, w) patches: 8 frames of 56x84 px, 4 frames of 84x56 (14-px patches)


def make_pair(model_type: str, tie: bool = False, seed: int = 0):
    if model_type == "qwen3_vl":
        hfc = qwen3_hf_config(tie)
        cls, ours_cls = transformers.Qwen3VLForConditionalGeneration, Qwen3VL
    else:
        hfc = qwen2_hf_config(model_type, tie)
        if model_type == "qwen2_5_vl":
            hfc.vision_config.tokens_per_second = TPS
        cls = (transformers.Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl"
               else transformers.Qwen2VLForConditionalGeneration)
        ours_cls = QwenVL
    cfg = parse_config(hfc.to_dict())
    ours = ours_cls(cfg).init_weights(seed, std=0.1).eval()
    hf = cls(hfc).eval()
    missing, unexpected = hf.load_state_dict({hf_key(k): v for k, v in ours.state_dict().items()}, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set()), (missing, unexpected)
    return ours, hf


def clip_tokens(model_type: str, grid: list[int], ts_token: int = 30) -> list[int]:
    """A clip's prompt tokens. Qwen2/2.5-VL: <|vision_start|> + t*h*w/4 video tokens + <|vision_end|>. Qwen3-VL as
    transformers 5.24's processor writes it inside the template's wrapper: <|vision_start|>, then per temporal patch
    a timestamp text token and <|vision_start|> + h*w/4 video tokens + <|vision_end|>, then <|vision_end|>."""
    t, h, w = grid
    if model_type != "qwen3_vl":
        return [VSTART] + [VID] * (t * h * w // 4) + [VEND]
    out = [VSTART]
    for ti in range(t):
        out += [ts_token + ti, VSTART] + [VID] * (h * w // 4) + [VEND]
    return out + [VEND]


def batch(model_type: str, mixed: bool):
    """Left-padded batch. mixed: [clip 0] text; text [img 4x4] text [clip 1] text; text only. Video only: [clip 0]
    text; text [clip 1] text."""
    patch = 16 if model_type == "qwen3_vl" else 14
    patch_dim = 3 * 2 * patch * patch
    img_grids = torch.tensor([[1, 4, 4]]) if mixed else None
    img = [VSTART] + [IMG] * 4 + [VEND]
    rows = [[5, 6] + clip_tokens(model_type, VIDEO_GRIDS[0]) + [7, 8, 9]]
    rows.append([10] + (img + [11] if mixed else []) + clip_tokens(model_type, VIDEO_GRIDS[1], 40) + [12, 13])
    if mixed:
        rows.append([14, 15, 16, 17, 18])
    ids, am = left_pad(rows)
    g = torch.Generator().manual_seed(1)
    vid_grids = torch.tensor(VIDEO_GRIDS)
    pix_v = torch.randn(int(vid_grids.prod(-1).sum()), patch_dim, generator=g)  # (video patches, C*t*p*p)
    pix_i = torch.randn(int(img_grids.prod(-1).sum()), patch_dim, generator=g) if mixed else None
    return ids, am, img_grids, pix_i, vid_grids, pix_v


def our_positions(ours, ids, am, img_grids, vid_grids):
    cfg = ours.config
    grids, steps = video_rope_grids(cfg.model_type, vid_grids, torch.tensor(SECONDS),
                                    tokens_per_second=getattr(cfg.vision, "tokens_per_second", 1))
    return mrope_position_ids(ids, am, img_grids, image_token_id=IMG, video_grid_thw=grids, video_token_id=VID,
                              video_steps=steps)


def hf_kwargs(model_type, ids, am, img_grids, pix_i, vid_grids, pix_v):
    kw = dict(input_ids=ids, attention_mask=am, pixel_values=pix_i, image_grid_thw=img_grids,
              pixel_values_videos=pix_v, video_grid_thw=vid_grids,
              mm_token_type_ids=(ids == IMG).int() + 2 * (ids == VID).int())
    if model_type == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.tensor(SECONDS)
    return kw


FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen2_vl"]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("mixed", [False, True])
def test_positions_match_transformers_rope_index(model_type, mixed):
    ours, hf = make_pair(model_type)
    ids, am, img_grids, _, vid_grids, _ = batch(model_type, mixed)
    pos, nxt = our_positions(ours, ids, am, img_grids, vid_grids)
    kw = hf_kwargs(model_type, ids, am, img_grids, None, vid_grids, None)
    extra = {"second_per_grid_ts": kw["second_per_grid_ts"]} if model_type == "qwen2_5_vl" else {}
    with internals("get_rope_index's arguments"):
        ref, deltas = hf.model.get_rope_index(ids, kw["mm_token_type_ids"], img_grids, vid_grids, attention_mask=am,
                                              **extra)
    assert torch.equal(pos * am, ref * am), "M-RoPE ids of clips differ from transformers on real tokens"
    assert torch.equal(nxt, am.sum(1) + deltas.squeeze(1)), "next_position disagrees with rope_deltas"
    if model_type == "qwen2_5_vl":
        # clip 0 (step 1.5) starts at id 3 (after 5, 6, <|vision_start|>): temporal ids 3 + floor(ti * 1.5)
        t_ids = pos[0, 0][ids[0] == VID].view(4, -1)[:, 0].tolist()
        assert t_ids == [3, 4, 6, 7], f"absolute-time temporal ids {t_ids}"


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("mixed", [False, True])
def test_logits_and_logprobs_match_transformers(model_type, mixed):
    ours, hf = make_pair(model_type)
    ids, am, img_grids, pix_i, vid_grids, pix_v = batch(model_type, mixed)
    pos, _ = our_positions(ours, ids, am, img_grids, vid_grids)
    T = 3
    with torch.no_grad():
        ref = hf(**hf_kwargs(model_type, ids, am, img_grids, pix_i, vid_grids, pix_v)).logits  # (N, L, V)
        img_emb = ours.encode_images(pix_i, img_grids) if mixed else None
        vid_emb = ours.encode_videos(pix_v, vid_grids)
        out = ours.logits(ours(ids, pos, am, image_embeds=img_emb, video_embeds=vid_emb))
        lp = ours.logprobs(ids, pos, am, T, image_embeds=img_emb, video_embeds=vid_emb, chunk_size=4)
    valid = am.bool()
    err = (ref - out)[valid].abs().max()
    assert err < 1e-4 * ref[valid].abs().max().clamp(min=1), f"clip logits differ from transformers by {err:.2e}"
    ref_lp = torch.log_softmax(ref.float(), -1)[:, -T - 1:-1].gather(-1, ids[:, -T:, None]).squeeze(-1)  # (N, T)
    assert (lp - ref_lp).abs().max() < 1e-4, f"clip log-probs differ by {(lp - ref_lp).abs().max():.2e}"
    # the clip reaches the logits: other pixels, other logits on the clip rows
    with torch.no_grad():
        other = ours.logits(ours(ids, pos, am, image_embeds=img_emb,
                                 video_embeds=ours.encode_videos(pix_v.flip(0), vid_grids)))
    assert (other[0] - out[0]).abs().max() > 1e-3, "video features do not reach the decoder"


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_video_gradients_match_transformers(model_type):
    """Gradient of one scalar loss for every parameter on the mixed batch (Qwen2.5-VL: window attention within
    each temporal patch; Qwen3-VL: DeepStack features of clips and images at their joint positions)."""
    ours, hf = make_pair(model_type)
    ids, am, img_grids, pix_i, vid_grids, pix_v = batch(model_type, True)
    pos, _ = our_positions(ours, ids, am, img_grids, vid_grids)
    ref = hf(**hf_kwargs(model_type, ids, am, img_grids, pix_i, vid_grids, pix_v)).logits
    out = ours.logits(ours(ids, pos, am, image_embeds=ours.encode_images(pix_i, img_grids),
                           video_embeds=ours.encode_videos(pix_v, vid_grids)))
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    valid = am.bool()
    (ref * w)[valid].sum().backward()
    (out * w)[valid].sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        q = hf_params[hf_key(name)]
        assert p.grad is not None and q.grad is not None, f"no gradient for {name}"
        gerr = (p.grad - q.grad).abs().max() / q.grad.abs().max().clamp(min=1e-6)
        assert gerr < 1e-3, f"gradient of {name} differs from transformers (rel {gerr:.2e})"


def test_cached_decoding_after_a_clip_matches_full_forward():
    """Prefill a clip prompt into the static cache and decode: equal to one full forward (decode positions continue
    from the clip row's max id + 1)."""
    ours, _ = make_pair("qwen2_5_vl")
    ids, am, img_grids, pix_i, vid_grids, pix_v = batch("qwen2_5_vl", True)
    N, P = ids.shape
    T = 3
    pos, nxt = our_positions(ours, ids, am, img_grids, vid_grids)
    kw = dict(image_embeds=ours.encode_images(pix_i, img_grids), video_embeds=ours.encode_videos(pix_v, vid_grids))
    cont = torch.randint(0, 80, (N, T), generator=torch.Generator().manual_seed(3))  # (N, T)
    with torch.no_grad():
        cache = ours.new_cache(N, P + T)
        am_c = torch.cat([am, torch.ones(N, T, dtype=torch.long)], 1)  # (N, S)
        h = ours(ids, pos, am_c, cache=cache, cache_position=torch.arange(P), **kw)
        steps = [ours.logits(h[:, -1:])]
        for t in range(T - 1):
            hs = ours(cont[:, t:t + 1], decode_position_ids(nxt, t), am_c, cache=cache,
                      cache_position=torch.tensor([P + t]))
            steps.append(ours.logits(hs))
        inc = torch.cat(steps, 1)  # (N, T, V)
        full_pos = torch.cat([pos, decode_position_ids(nxt, 0, T)], 2)
        full = ours.logits(ours(torch.cat([ids, cont], 1), full_pos, am_c, **kw))[:, P - 1:P + T - 1]
    assert (inc - full).abs().max() < 1e-4 * full.abs().max().clamp(min=1), "cached decode != full forward"


def test_video_count_mismatch_is_an_error():
    ours, _ = make_pair("qwen2_5_vl")
    ids, am, img_grids, pix_i, vid_grids, pix_v = batch("qwen2_5_vl", False)
    pos, _ = our_positions(ours, ids, am, img_grids, vid_grids)
    emb = ours.encode_videos(pix_v, vid_grids)
    with pytest.raises(ValueError, match="video tokens but video_embeds"):
        ours(ids, pos, am, video_embeds=emb[:-1])
    with pytest.raises(ValueError, match="video 1 .* consecutive video tokens"):
        mrope_position_ids(ids, am, None, image_token_id=IMG, video_grid_thw=torch.tensor([[4, 4, 6], [4, 6, 4]]),
                           video_token_id=VID)


def test_video_tokens_without_video_embeds_are_an_error():
    """Paths that do not pass clips yet (the sampler, scoring, the judge) fail loudly instead of embedding the
    clip's placeholder tokens as text."""
    ours, _ = make_pair("qwen3_vl")
    ids, am, img_grids, pix_i, vid_grids, _ = batch("qwen3_vl", True)
    pos, _ = our_positions(ours, ids, am, img_grids, vid_grids)
    with pytest.raises(ValueError, match="input_ids hold video tokens but no video_embeds"):
        ours(ids, pos, am, image_embeds=ours.encode_images(pix_i, img_grids))


def test_tokens_per_second_read_as_transformers_reads_it():
    """A Qwen2.5-VL config.json without vision_config.tokens_per_second means transformers' default (4), which
    sets the clip's temporal M-RoPE step; the published files' 2 is kept."""
    d = qwen2_hf_config("qwen2_5_vl", False).to_dict()
    d["vision_config"].pop("tokens_per_second", None)
    ref = transformers.Qwen2_5_VLConfig(**d).vision_config.tokens_per_second
    assert parse_config(d).vision.tokens_per_second == ref == 4
    d["vision_config"]["tokens_per_second"] = 2
    assert parse_config(d).vision.tokens_per_second == 2
