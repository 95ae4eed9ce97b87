"""Qwen3-VL: emor3.models.Qwen3VL against transformers' Qwen3VLForConditionalGeneration holding the same weights
(tiny random configs, fp32, CPU), and the config layouts of the published checkpoints.

Covered: logits and gradients of every parameter on a left-padded batch mixing a one-image row, a text-only row
and a two-image row with images of different sizes (some grids larger, some smaller than the learned
position-embedding table); completion log-probs vs transformers' log_softmax; M-RoPE ids vs `get_rope_index`;
interleaved M-RoPE frequencies; KV-cache decoding vs the full forward; gradient checkpointing; head_dim independent
of hidden / heads (as in 4B); the 4.57 (published) and 5.x config.json layouts and the named sizes.
"""

import copy
import os

import pytest
import torch
import transformers
from hf_reference import image_only_processor, internals

from emor3.models import Qwen3VL, Qwen3VLConfig, parse_config, tiny_config
from emor3.models.positions import decode_position_ids, mrope_position_ids
from test_models_parity import hf_key, mixed_batch as qwen2_mixed_batch

IMG, VSTART, VEND = 90, 92, 93
V = 96
PATCH_DIM = 3 * 2 * 16 * 16


def tiny_hf_config(tie: bool):
    # head_dim 32 != hidden 64 / 4 heads; 16 learned position embeddings (a 4x4 table) resampled to 8x12, 4x4, 6x4
    text = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                 "mrope_interleaved": True})
    vis = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
               num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vis, image_token_id=IMG, video_token_id=91,
                                      vision_start_token_id=VSTART, vision_end_token_id=VEND,
                                      tie_word_embeddings=tie)


def make_pair(tie: bool = False, seed: int = 0):
    hfc = tiny_hf_config(tie)
    cfg = parse_config(hfc.to_dict())
    assert isinstance(cfg, Qwen3VLConfig)
    ours = Qwen3VL(cfg).init_weights(seed, std=0.1).eval()
    hf = transformers.Qwen3VLForConditionalGeneration(hfc).eval()
    sd = {hf_key(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set()), (missing, unexpected)
    return ours, hf


def mixed_batch():
    """The Qwen2.5-VL parity tests' mixed batch, with Qwen3-VL's 16-px patches."""
    return qwen2_mixed_batch(PATCH_DIM)


def hf_logits(hf, ids, am, grids, pix, pos):
    return hf(input_ids=ids, attention_mask=am, position_ids=pos, pixel_values=pix, image_grid_thw=grids,
              mm_token_type_ids=(ids == IMG).int()).logits


def test_positions_match_transformers_rope_index():
    _, hf = make_pair()
    ids, am, grids, _ = mixed_batch()
    pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=IMG, spatial_merge_size=2)
    with internals("get_rope_index's arguments"):
        ref, deltas = hf.model.get_rope_index(ids, (ids == IMG).int(), grids, attention_mask=am)
    assert torch.equal(pos * am, ref * am), "M-RoPE ids differ from transformers on real tokens"
    assert torch.equal(nxt, am.sum(1) + deltas.squeeze(1)), "next_position disagrees with rope_deltas"


def test_interleaved_frequencies():
    """Frequency j of head_dim/2 = 16 with section (6, 5, 5) reads t, h, w, t, h, w, ..., t: a position that moves
    only along width changes exactly the angles j = 2, 5, 8, 11, 14."""
    from emor3.models.qwen3_vl import interleaved_mrope_cos_sin

    cfg, _ = make_pair()[0].config.text, None
    base = torch.zeros(3, 1, 1, dtype=torch.long)
    moved = base.clone()
    moved[2] = 7
    c0, _ = interleaved_mrope_cos_sin(base, cfg, torch.float32)
    c1, _ = interleaved_mrope_cos_sin(moved, cfg, torch.float32)
    changed = ((c0 - c1).abs()[0, 0, :16] > 1e-7).nonzero().flatten().tolist()
    assert changed == [2, 5, 8, 11, 14]


@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_grad_parity(tie):
    ours, hf = make_pair(tie)
    ids, am, grids, pix = mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    ref = hf_logits(hf, ids, am, grids, pix, pos)
    out = ours.logits(ours(ids, pos, am, image_embeds=ours.encode_images(pix, grids)))
    valid = am.bool()
    scale = ref[valid].abs().max()
    err = (ref - out)[valid].abs().max() / scale.clamp(min=1)
    assert err < 1e-4, f"logits differ from transformers by {err:.2e} (scale {scale:.2f})"
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    (ref * w)[valid].sum().backward()
    (out * w)[valid].sum().backward()
    hf_params = dict(hf.named_parameters())
    n_checked = 0
    for name, p in ours.named_parameters():
        q = hf_params[hf_key(name)]
        assert p.grad is not None and q.grad is not None, f"no gradient for {name}"
        gerr = (p.grad - q.grad).abs().max() / q.grad.abs().max().clamp(min=1e-6)
        assert gerr < 1e-3, f"gradient of {name} differs from transformers (rel {gerr:.2e})"
        n_checked += 1
    assert n_checked == len(list(ours.parameters()))
    # DeepStack reaches the decoder: every DeepStack merger gets a gradient, and dropping the features changes
    # the logits
    assert all(p.grad.abs().sum() > 0 for p in ours.visual.deepstack_merger_list.parameters())


def test_completion_logprobs_match_transformers():
    """The last T tokens of every row as a completion: chunked log-probs (temperature 1) vs log_softmax of
    transformers' logits."""
    ours, hf = make_pair()
    ids, am, grids, pix = mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    T = 3
    with torch.no_grad():
        ref_all = torch.log_softmax(hf_logits(hf, ids, am, grids, pix, pos).float(), -1)[:, -T - 1:-1]
        ref = ref_all.gather(-1, ids[:, -T:, None]).squeeze(-1)  # (N, T)
        lp = ours.logprobs(ids, pos, am, T, image_embeds=ours.encode_images(pix, grids), chunk_size=4)
    assert (lp - ref).abs().max() < 1e-4, f"completion log-probs differ by {(lp - ref).abs().max():.2e}"


def test_deepstack_features_change_the_output():
    ours, _ = make_pair()
    ids, am, grids, pix = mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    with torch.no_grad():
        emb = ours.encode_images(pix, grids)
        assert emb.shape == (34, 3, 64)
        a = ours(ids, pos, am, image_embeds=emb)
        no_deep = emb.clone()
        no_deep[:, 1:] = 0
        b = ours(ids, pos, am, image_embeds=no_deep)
    assert (a[0] - b[0]).abs().max() > 1e-3 and torch.equal(a[1], b[1]), "DeepStack must touch image rows only"
    with pytest.raises(ValueError, match="DeepStack"):
        ours(ids, pos, am, image_embeds=emb[:, 0])


def test_cached_decoding_matches_full_forward():
    ours, _ = make_pair(tie=True)
    ids, am, grids, pix = mixed_batch()
    N, P = ids.shape
    G, T = 2, 4
    pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    emb = ours.encode_images(pix, grids)
    cont = torch.randint(0, 80, (N * G, T), generator=torch.Generator().manual_seed(3))  # (N*G, T)
    with torch.no_grad():
        cache = ours.new_cache(N, P + T)
        assert cache.k.shape[-1] == 32, "the cache uses the config's head_dim"
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
        full_ids = torch.cat([ids.repeat_interleave(G, 0), cont], 1)
        full_pos = torch.cat([pos.repeat_interleave(G, 1), decode_position_ids(nxt_g, 0, T)], 2)
        per_row = torch.split(emb, (ids == IMG).sum(1).tolist())
        emb_g = torch.cat([per_row[i] for i in range(N) for _ in range(G)])
        full = ours.logits(ours(full_ids, full_pos, am_g, image_embeds=emb_g))[:, P - 1:P + T - 1]
    assert (inc - full).abs().max() < 1e-4 * full.abs().max().clamp(min=1), "cached decode != full forward"


def test_gradient_checkpointing_same_gradients():
    ours, _ = make_pair()
    ids, am, grids, pix = mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)

    def grads():
        ours.zero_grad()
        ours.logprobs(ids, pos, am, 3, image_embeds=ours.encode_images(pix, grids)).sum().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    ours.train()
    plain = grads()
    ours.set_gradient_checkpointing(True)
    ck = grads()
    assert plain.keys() == ck.keys()
    assert all(torch.allclose(plain[k], ck[k], atol=1e-6) for k in plain)


# ------------------------------------------------------------------------------------------ config layouts
def published_4b() -> dict:
    """Qwen3-VL-4B-Instruct's config.json as published (written by transformers 4.57)."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
            "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
            "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936},
        "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
        "vision_config": {
            "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
            "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "vision_end_token_id": 151653, "vision_start_token_id": 151652,
    }


def test_published_and_5x_layouts_parse_to_the_named_size():
    pub = parse_config(published_4b())
    assert pub == tiny_config("qwen3-vl-4b"), "the 4B named size differs from the published config"
    # the same model through transformers 5.24 (its to_dict is the 5.x layout), and our own to_dict
    five = parse_config(transformers.Qwen3VLConfig(**published_4b()).to_dict())
    assert five == pub and parse_config(pub.to_dict()) == pub
    assert pub.text.head_dim == 128 and pub.text.hidden_size // pub.text.num_attention_heads == 80
    # transformers reads our to_dict into the same numbers
    back = transformers.Qwen3VLConfig(**pub.to_dict())
    assert back.text_config.head_dim == 128 and back.vision_config.deepstack_visual_indexes == [5, 11, 17]
    assert back.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert back.text_config.rope_parameters["rope_theta"] == 5000000


@pytest.mark.parametrize("name", ["qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"])
def test_named_sizes_build_on_meta_with_published_parameter_counts(name):
    """Parameter counts of the released checkpoints (bf16 file sizes / 2, rounded): 2B 2.13e9, 4B 4.44e9,
    8B 8.77e9."""
    want = {"qwen3-vl-2b": 2.13e9, "qwen3-vl-4b": 4.44e9, "qwen3-vl-8b": 8.77e9}[name]
    with torch.device("meta"):
        m = Qwen3VL(tiny_config(name))
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - want) / want < 0.01, f"{name}: {n / 1e9:.3f}B parameters"


def test_unsupported_settings_are_errors_naming_them():
    for mutate, needle in [
        (lambda d: d["text_config"]["rope_scaling"].update(mrope_interleaved=False), "mrope_interleaved"),
        (lambda d: d["text_config"].update(layer_types=["linear_attention"] * 36), "linear attention"),
        (lambda d: d["text_config"].update(attention_bias=True), "attention_bias"),
        (lambda d: d.update(model_type="qwen3_vl_moe"), "MoE"),
        (lambda d: d["vision_config"].update(window_size=112), "vision_config.window_size"),
        (lambda d: d.update(quantization_config={"quant_method": "fp8"}), "quantised"),
    ]:
        d = copy.deepcopy(published_4b())
        mutate(d)
        with pytest.raises(ValueError, match=needle):
            parse_config(d, source="x/config.json")


# ------------------------------------------------------------------------------------------ checkpoint IO
def _logits(m, hf: bool):
    ids, am, grids, pix = mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    with torch.no_grad():
        out = hf_logits(m, ids, am, grids, pix, pos) if hf else m.logits(
            m(ids, pos, am, image_embeds=m.encode_images(pix, grids)))
    return out * am[..., None]


@pytest.mark.parametrize("tie,shard", [(False, None), (True, 40_000)])
def test_checkpoint_round_trips_with_transformers(tmp_path, tie, shard):
    """ours -> folder (published key layout, single file or sharded) -> transformers, and transformers' own
    save_pretrained -> ours: the same logits every way."""
    from safetensors import safe_open

    from emor3.models import load_pretrained, save_pretrained

    ours, _ = make_pair(tie, seed=4)
    ref = _logits(ours, hf=False)
    save_pretrained(ours, tmp_path / "ck", max_shard_bytes=shard)
    files = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert (len(files) > 2) == (shard is not None), files
    with safe_open(tmp_path / "ck" / files[0], framework="pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("model.language_model.", "model.visual.", "lm_head.")) for k in keys), keys[:3]
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tie and hf.config.text_config.head_dim == 32
    assert torch.allclose(_logits(hf, hf=True), ref, atol=1e-5), "transformers reads our checkpoint differently"
    hf.save_pretrained(tmp_path / "hf")
    back = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert isinstance(back, Qwen3VL) and back.config == ours.config
    assert torch.allclose(_logits(back, hf=False), ref, atol=1e-6), "our loader misreads transformers' checkpoint"
    assert next(load_pretrained(tmp_path / "ck", dtype="bfloat16").parameters()).dtype == torch.bfloat16


def test_published_config_file_loads_in_both(tmp_path):
    """The 4.57 published config.json, shrunk to tiny sizes but otherwise as shipped (vision model_type
    "qwen3_vl", rope_scaling, tied, no lm_head stored), with weights in the published key layout."""
    import json

    from safetensors.torch import save_file

    from emor3.models import load_pretrained
    from emor3.models.checkpoint import published_key

    d = published_4b()
    d["text_config"].update(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    d["text_config"]["rope_scaling"]["mrope_section"] = [6, 5, 5]
    d["vision_config"].update(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                              num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
    d.update(image_token_id=IMG, video_token_id=91, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    (tmp_path / "config.json").write_text(json.dumps(d))
    m = Qwen3VL(parse_config(d)).init_weights(5, std=0.1)
    save_file({published_key(k, "qwen3_vl"): v.contiguous() for k, v in m.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    assert next(load_pretrained(tmp_path).parameters()).dtype == torch.bfloat16, "text_config.dtype not honoured"
    ours = load_pretrained(tmp_path, dtype=torch.float32)
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.allclose(_logits(ours, hf=False), _logits(hf, hf=True), atol=1e-5)


# ------------------------------------------------------------------------------------------ the pipeline
CORPUS = ["<step1>The person looks happy and excited at the party.</step1> <step2>She smiles.</step2> "
          "<step3>joy</step3> \\boxed{joy}", "A sad, gloomy rainy day; the man is crying. Yes no"] * 20


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from emor3.toy.model import build_tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny_qwen3_vl")
    build_tiny_checkpoint(d, CORPUS, name="tiny-qwen3-vl", seed=0, vocab_size=400)
    return d


def prompts():
    from PIL import Image

    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How does she feel?"}]}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name an emotion."}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "versus"}, {"type": "image"}]}]]
    imgs = [[Image.new("RGB", (112, 84), (200, 30, 30))], [],
            [Image.new("RGB", (150, 90), (10, 90, 200)), Image.new("L", (64, 64), 128)]]
    return msgs, imgs


def test_processor_matches_transformers_qwen3_vl_processor(tiny_ckpt):
    """emor3's Processor on a Qwen3-VL folder == transformers' Qwen3VLProcessor (without its video processor,
    which needs torchvision): ids, mask, pixels, grids; and the 16-px, mean = std = 0.5 image processing."""
    from emor3.models import Processor

    proc = Processor.from_pretrained(tiny_ckpt)
    assert proc.image_processor.patch_size == 16 and list(proc.image_processor.image_mean) == [0.5] * 3
    assert not proc.thinking
    msgs, imgs = prompts()
    batch = proc.encode_prompts(msgs, imgs)
    texts = [proc.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    with internals("Qwen3VLProcessor without a video processor"):
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

        ref_proc = image_only_processor(Qwen3VLProcessor, proc.image_processor, proc.tokenizer)
        ref = ref_proc(text=texts, images=[im for row in imgs for im in row], return_tensors="pt", padding=True,
                       padding_side="left")
    assert torch.equal(batch.input_ids, ref["input_ids"]) and torch.equal(batch.attention_mask, ref["attention_mask"])
    assert torch.equal(batch.pixel_values, ref["pixel_values"])
    assert torch.equal(batch.image_grid_thw, ref["image_grid_thw"])
    assert batch.pixel_values.shape[1] == PATCH_DIM
    assert texts[1].startswith("<|im_start|>system\nBe brief.") and not texts[0].startswith("<|im_start|>system")


def test_sampler_greedy_equals_generate_and_logprobs_equal_teacher_forcing(tiny_ckpt):
    """The real path on a tiny Qwen3-VL folder: emor3's Processor and sampler vs transformers loading the same
    folder; greedy tokens equal `generate`; sampled log-probs equal the trainer's teacher-forced
    `completion_logprobs` (ratio exactly 1 on the first update)."""
    from emor3.engine.scoring import completion_logprobs
    from emor3.engine.sampler import sample
    from emor3.models import Processor, load_pretrained

    proc = Processor.from_pretrained(tiny_ckpt)
    model = load_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    assert isinstance(model, Qwen3VL)
    batch = proc.encode_prompts(*prompts())
    B = batch.batch_size
    r = sample(model, batch, group_size=1, max_new_tokens=10, temperature=0.0, stop_token_ids=proc.stop_token_ids,
               banned_token_ids=proc.banned_token_ids, tokenizer=proc, generator=0)
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                      image_grid_thw=batch.image_grid_thw,
                      mm_token_type_ids=(batch.input_ids == model.config.image_token_id).int(), max_new_tokens=10,
                      do_sample=False, suppress_tokens=list(proc.banned_token_ids),
                      eos_token_id=list(proc.stop_token_ids), pad_token_id=proc.pad_token_id)
    out = out[:, batch.input_ids.shape[1]:]
    for n in range(B):
        k = int(r.lengths[n])
        assert r.completion_ids[n, :k].tolist() == out[n, :k].tolist(), f"row {n}: greedy differs from generate"
    G = 3
    s = sample(model, batch, group_size=G, max_new_tokens=8, temperature=1.0, stop_token_ids=proc.stop_token_ids,
               banned_token_ids=proc.banned_token_ids, tokenizer=proc, generator=1)
    with torch.no_grad():
        ref = completion_logprobs(model, batch, s.prompt_index, s.completion_ids, s.completion_mask)
    err = ((ref - s.logprobs) * s.completion_mask).abs().max()
    assert err < 1e-5, f"sampler log-probs differ from teacher forcing by {err:.2e}"


def test_thinking_template_answer_and_closed_block(tmp_path):
    from emor3.models import Processor
    from emor3.toy.model import build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path, CORPUS, name="tiny-qwen3-vl-thinking", seed=0, vocab_size=400)
    proc = Processor.from_pretrained(tmp_path)
    assert proc.thinking
    msgs = [[{"role": "user", "content": "Name an emotion."}]]
    open_ids = proc.encode_prompts(msgs).input_ids[0].tolist()
    closed_ids = proc.encode_prompts(msgs, close_thinking=True).input_ids[0].tolist()
    assert proc.decode(open_ids, skip_special_tokens=False).endswith("assistant\n<think>\n")
    assert proc.decode(closed_ids, skip_special_tokens=False).endswith("assistant\n<think>\n\n</think>\n\n")
    # the sampler's texts keep <think> / </think> (added tokens, not special), so the answer can be split off
    think = proc.tokenizer("a sad day</think>\n\n<step1>x</step1>", add_special_tokens=False)["input_ids"]
    text = proc.decode(think)
    assert text == "a sad day</think>\n\n<step1>x</step1>"
    assert proc.answer(text) == "<step1>x</step1>"
    assert proc.answer("still reasoning, never closed") == "", "an unclosed reasoning block scores nothing"
    plain = Processor.from_pretrained(tmp_path)
    plain.thinking = False
    assert plain.answer(text) == text, "Instruct models' completions are scored as they are"


def test_one_grpo_step_on_a_tiny_thinking_qwen3_vl(tmp_path):
    """The whole run (SFT, GRPO with SET + RER judged by the same model, evaluation) on the tiny Thinking
    Qwen3-VL: every parameter moves, sampler and trainer log-probs agree."""
    import json
    from pathlib import Path

    from emor3.checkpoints import latest_checkpoint
    from emor3.grpo.train import train
    from emor3.models import load_pretrained
    from test_train import tiny_config as train_config

    (tmp_path / "emor3_q3_plugin.py").write_text(
        "def length_reward(prompts, completions, **kw):\n    return [len(c) / 100.0 for c in completions]\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        cfg = train_config(tmp_path, model={"tiny": "tiny-qwen3-vl-thinking"}, grpo={"steps": 1},
                           sft={"steps": 1}, reward={"plugins": ["emor3_q3_plugin:length_reward=1.0"]})
        train(cfg)
    finally:
        sys.path.remove(str(tmp_path))
    out = Path(cfg.run.out)
    before = dict(load_pretrained(out / "init").state_dict())
    after = dict(load_pretrained(latest_checkpoint(out) / "model").state_dict())
    assert isinstance(load_pretrained(out / "init"), Qwen3VL)
    frozen = [k for k in before if torch.equal(before[k], after[k])]
    assert not frozen, f"parameters that never moved: {frozen}"
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["logp_gap"] < 1e-4 and row["ratio_mean"] == pytest.approx(1.0)


def test_experiment_resizes_images_on_the_qwen3_vl_grid(tmp_path):
    """A run on a Qwen3-VL model pre-resizes dataset images in multiples of 32 px (16-px patches x merge 2), the
    grid its image processor uses, not Qwen2.5-VL's 28."""
    from pathlib import Path

    from emor3.stages.build import build
    from emor3.toy.world import WORLD
    from test_train import tiny_config as train_config

    cfg = train_config(tmp_path, model={"tiny": "tiny-qwen3-vl", "min_pixels": 64 * 64, "max_pixels": 150 * 150})
    run = build(cfg, Path(cfg.run.out), WORLD)
    assert isinstance(run.model, Qwen3VL) and run.train_set.factor == 32
    w, h = run.train_set.image(0).size
    assert w % 32 == 0 and h % 32 == 0, (w, h)


FSDP_SCRIPT = r'''
import copy, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
from emor3.distributed import wrap_policy
from emor3.engine.scoring import completion_logprobs
from emor3.models import Qwen3VL, parse_config
from emor3.models.positions import mrope_position_ids
from emor3.models.processing import PromptBatch
from test_qwen3_vl import IMG, mixed_batch, tiny_hf_config

model = Qwen3VL(parse_config(tiny_hf_config(False).to_dict())).init_weights(0, std=0.1).train()
plain = copy.deepcopy(model)
ids, am, grids, pix = mixed_batch()
pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=IMG)
batch = PromptBatch(ids, am, pos, pix, grids, nxt, num_images=[1, 0, 2])
index = torch.arange(3).repeat_interleave(2)  # (6,)
comp = torch.randint(0, 80, (6, 4), generator=torch.Generator().manual_seed(0))  # (6, 4)
mask = torch.ones(6, 4)  # (6, 4)
scorer = wrap_policy(model, "fsdp", torch.device("cpu"), "fp32")
from torch.distributed.fsdp import FSDPModule
units = sum(isinstance(m, FSDPModule) for m in scorer.modules())
lp = scorer(batch, index, comp, mask)
ref = completion_logprobs(plain, batch, index, comp, mask)
w = torch.linspace(-1, 1, lp.numel()).view_as(lp)
(lp * w).sum().backward()
(ref * w).sum().backward()
worst = 0.0
for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    worst = max(worst, float((g - q.grad).abs().max() / q.grad.abs().max().clamp(min=1e-12)))
print("RESULT", units, float((lp - ref).abs().max()), worst)
dist.destroy_process_group()
'''


def test_fsdp2_wrapping_scores_and_backpropagates_like_the_plain_model(tmp_path):
    """The FSDP2 policy handle (one unit per decoder layer and vision block, DeepStack mergers in the root) on one
    gloo process: log-probs and every gradient equal the unwrapped model's."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "fsdp_qwen3.py"
    script.write_text(FSDP_SCRIPT)
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(tests_dir.parent)}
    out = subprocess.run([sys.executable, str(script), str(tests_dir)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tests_dir.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    units, lp_err, grad_err = out.stdout.split("RESULT")[-1].split()
    assert int(units) == 3 + 3 + 1, "one unit per decoder layer and vision block, plus the root"
    assert float(lp_err) < 1e-5 and float(grad_err) < 1e-4, (lp_err, grad_err)
