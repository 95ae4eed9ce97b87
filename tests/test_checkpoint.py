"""Checkpoint IO round trips between emor3.models and transformers (tiny random models, fp32, CPU, offline).

ours -> transformers and transformers -> ours give the same logits; both key layouts (published `model.layers.*` /
`visual.*` and transformers-5 native `model.language_model.*` / `model.visual.*`); a sharded checkpoint; both
config layouts; tied and untied embeddings; the published Qwen2.5-VL-3B-Instruct and Qwen2-VL-2B-Instruct
config.json files parse; bad checkpoints fail with errors naming what is wrong.
"""

import copy
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from emor3.models import QwenVL, QwenVLConfig
from emor3.models.checkpoint import load_pretrained, save_pretrained
from emor3.models.positions import mrope_position_ids

IMG = 90


def tiny_config(model_type: str, tie: bool) -> QwenVLConfig:
    d = {"model_type": model_type, "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
         "tie_word_embeddings": tie, "image_token_id": IMG, "video_token_id": 91, "vision_start_token_id": 92,
         "vision_end_token_id": 93}
    if model_type == "qwen2_5_vl":
        d["vision_config"] = {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                              "out_hidden_size": 64, "fullatt_block_indexes": [1], "window_size": 56, "in_chans": 3}
    else:
        d["vision_config"] = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                              "in_chans": 3}
    return QwenVLConfig.from_dict(d)


def inputs():
    grids = torch.tensor([[1, 4, 6]])
    ids = torch.tensor([[0, 0, 5, 92] + [IMG] * 6 + [93, 7], [0] * 8 + [8, 9, 10, 11]])
    am = (torch.arange(12) >= torch.tensor([[2], [8]])).long()
    pix = torch.randn(24, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    return ids, am, pos, pix, grids


def ours_logits(m: QwenVL):
    ids, am, pos, pix, grids = inputs()
    with torch.no_grad():
        return m.logits(m(ids, pos, am, image_embeds=m.encode_images(pix, grids))) * am[..., None]


def hf_logits(m):
    ids, am, pos, pix, grids = inputs()
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=am, position_ids=pos, pixel_values=pix, image_grid_thw=grids).logits
    return out * am[..., None]


def hf_class(model_type):
    return (transformers.Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl"
            else transformers.Qwen2VLForConditionalGeneration)


CASES = [("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen2_vl", True), ("qwen2_vl", False)]


@pytest.mark.parametrize("model_type,tie", CASES)
def test_ours_to_transformers_and_back(tmp_path, model_type, tie):
    ours = QwenVL(tiny_config(model_type, tie)).init_weights(1, std=0.1).eval()
    save_pretrained(ours, tmp_path / "ck")
    hf = hf_class(model_type).from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tie, "tie_word_embeddings lost in our config.json"
    ref = ours_logits(ours)
    assert torch.allclose(hf_logits(hf), ref, atol=1e-5), "transformers reads our checkpoint as a different model"
    # transformers -> ours (transformers writes its own layout/config); then our loader reads it
    hf.save_pretrained(tmp_path / "hf")
    back = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.allclose(ours_logits(back), ref, atol=1e-5), "our loader misreads transformers' checkpoint"
    with open(tmp_path / "hf" / "config.json") as f:
        assert "text_config" in json.load(f), "expected transformers 5 to write the nested config layout"


def test_native_key_layout_sharded_and_dtype(tmp_path):
    ours = QwenVL(tiny_config("qwen2_5_vl", False)).init_weights(2, std=0.1).eval()
    ref = ours_logits(ours)
    # sharded save, read back by us and by transformers
    save_pretrained(ours, tmp_path / "sh", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2, "max_shard_bytes did not shard"
    assert torch.allclose(ours_logits(load_pretrained(tmp_path / "sh")), ref, atol=1e-6)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "sh").eval()
    assert torch.allclose(hf_logits(hf), ref, atol=1e-5)
    # transformers-5 native key names in a single file
    (tmp_path / "nat").mkdir()
    sd = {}
    for k, v in ours.state_dict().items():
        k = "model.language_model." + k[6:] if k.startswith("model.") else ("model." + k if k.startswith("visual.")
                                                                              else k)
        sd[k] = v.contiguous()
    save_file(sd, str(tmp_path / "nat" / "model.safetensors"))
    # with the 5.x config layout as transformers writes it
    hf.config.save_pretrained(tmp_path / "nat")
    nat = load_pretrained(tmp_path / "nat", dtype=torch.float32)
    assert torch.allclose(ours_logits(nat), ref, atol=1e-6), "native key layout misread"
    # loading straight into bf16
    bf = load_pretrained(tmp_path / "nat", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert torch.equal(bf.model.embed_tokens.weight, ours.model.embed_tokens.weight.bfloat16())


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    ours = QwenVL(tiny_config("qwen2_vl", True)).init_weights(0)
    save_pretrained(ours, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.7.foo.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\].*model.layers.7.foo"):
        load_pretrained(tmp_path)


def test_unknown_or_unsupported_settings_are_named():
    base = tiny_config("qwen2_5_vl", False).to_dict()
    for patch, needle in [({"some_new_knob": 1}, "some_new_knob"), ({"use_sliding_window": True}, "sliding"),
                          ({"rope_scaling": {"type": "yarn", "factor": 2.0, "mrope_section": [2, 3, 3]}}, "yarn"),
                          ({"model_type": "qwen3_vl"}, "qwen3_vl")]:
        d = {**copy.deepcopy(base), **patch}
        with pytest.raises(ValueError, match=needle):
            QwenVLConfig.from_dict(d)
    d = copy.deepcopy(base)
    d["vision_config"]["mystery"] = 3
    with pytest.raises(ValueError, match="vision_config.mystery"):
        QwenVLConfig.from_dict(d)


# config.json of Qwen/Qwen2.5-VL-3B-Instruct as published on the Hub (transformers 4.x layout)
QWEN25_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}
# config.json of Qwen/Qwen2-VL-2B-Instruct as published on the Hub
QWEN2_VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


def _shrink(d):
    """Same fields and layout, tiny sizes, so a real model can be built and loaded by transformers."""
    d = copy.deepcopy(d)
    d.update(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=151936 // 64)
    d["rope_scaling"]["mrope_section"] = [2, 3, 3]
    for k in ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id",
              "image_token_id", "video_token_id"):
        d[k] -= 151936 - 151936 // 64
    v = d["vision_config"]
    if d["model_type"] == "qwen2_5_vl":
        v.update(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                 fullatt_block_indexes=[1, 3])
    else:
        v.update(depth=2, embed_dim=32, num_heads=2, hidden_size=64)
    return d


@pytest.mark.parametrize("published", [QWEN25_VL_3B, QWEN2_VL_2B], ids=["qwen2.5-vl-3b", "qwen2-vl-2b"])
def test_published_configs_parse_and_load(tmp_path, published):
    cfg = QwenVLConfig.from_dict(published)
    t, v = cfg.text, cfg.vision
    assert cfg.tie_word_embeddings and t.num_key_value_heads == 2 and t.mrope_section == (16, 24, 24)
    assert t.rope_theta == 1e6 and t.vocab_size == 151936 and cfg.image_token_id == 151655
    if cfg.model_type == "qwen2_5_vl":
        assert (t.hidden_size, t.num_hidden_layers, v.hidden_size, v.intermediate_size) == (2048, 36, 1280, 3420)
        assert v.fullatt_block_indexes == (7, 15, 23, 31) and v.window_size == 112 and v.out_hidden_size == 2048
    else:
        assert (t.hidden_size, t.num_hidden_layers, v.hidden_size, v.intermediate_size) == (1536, 28, 1280, 5120)
        assert v.hidden_act == "quick_gelu" and v.out_hidden_size == 1536
    # the same file shape with tiny sizes: written as published (config as-is, tied, no lm_head), loaded by both
    small = _shrink(published)
    (tmp_path / "config.json").write_text(json.dumps(small))
    m = QwenVL(QwenVLConfig.from_dict(small)).init_weights(3, std=0.1).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    ours = load_pretrained(tmp_path)
    assert next(ours.parameters()).dtype == torch.bfloat16, "torch_dtype from config.json not honoured"
    hf = hf_class(small["model_type"]).from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours.config.image_token_id = IMG  # inputs() uses token 90 for image placeholders
    hf.config.image_token_id = IMG
    hf.model.config.image_token_id = IMG
    a, b = ours_logits(ours).float(), hf_logits(hf).float()
    assert (a - b).abs().max() <= 0.02 * b.abs().max(), "published-layout checkpoint loads differently (bf16)"


def test_save_copies_tokenizer_files(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "preprocessor_config.json").write_text('{"patch_size": 14}')
    (tok / "unrelated.bin").write_text("x")
    save_pretrained(QwenVL(tiny_config("qwen2_vl", True)), tmp_path / "out", tokenizer_dir=tok)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "preprocessor_config.json", "config.json", "model.safetensors"} <= names
    assert "unrelated.bin" not in names and not any(n.startswith(".") for n in names), "temp files left behind"


# ---------------------------------------------------------------------------------------------- damaged files


class _Opaque:
    """An object a weights_only load must refuse."""


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "cut_header"])
def test_corrupt_safetensors_names_the_file_and_what_to_do(tmp_path, damage):
    from emor3.models.checkpoint import CheckpointError
    ours = QwenVL(tiny_config("qwen2_vl", True)).init_weights(0)
    save_pretrained(ours, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": b"not a safetensors file at all", "empty": b"", "truncated": data[: len(data) // 2],
                   "cut_header": data[:12]}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*(download|copy) it again") as e:
        load_pretrained(tmp_path)
    assert str(f) in str(e.value), "the error must name the damaged file"


def test_corrupt_index_names_the_file(tmp_path):
    from emor3.models.checkpoint import CheckpointError
    save_pretrained(QwenVL(tiny_config("qwen2_vl", True)).init_weights(0), tmp_path, max_shard_bytes=20_000)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: is not a valid safetensors index"):
        load_pretrained(tmp_path)


def test_torch_state_round_trip_and_damaged_files(tmp_path):
    from emor3.models.checkpoint import CheckpointError, load_torch_state, save_torch_state
    state = {"step": 3, "rng": torch.arange(5), "opt": {"lr": [1e-3]}}
    p = tmp_path / "trainer_state.pt"
    save_torch_state(state, p)
    back = load_torch_state(p)
    assert back["step"] == 3 and torch.equal(back["rng"], state["rng"]) and back["opt"] == state["opt"]
    assert [q.name for q in tmp_path.iterdir()] == ["trainer_state.pt"], "no temporary file may be left behind"
    good = p.read_bytes()
    for name, data in [("empty", b""), ("truncated", good[: len(good) // 3]), ("garbage", b"\x00junk")]:
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=r"trainer_state\.pt: the trainer state file .*resume from "
                                                  r"another checkpoint") as e:
            load_torch_state(p)
        assert str(p) in str(e.value), name
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torch_state(tmp_path / "nope.pt")

    torch.save({"x": _Opaque()}, p)  # a pickled class: weights_only refuses it, and the error says so
    with pytest.raises(CheckpointError, match="weights_only"):
        load_torch_state(p)


def test_written_files_get_the_users_file_mode(tmp_path):
    import os
    import stat
    from emor3.models.checkpoint import save_torch_state
    old = os.umask(0o027)
    try:
        save_pretrained(QwenVL(tiny_config("qwen2_vl", True)), tmp_path / "m")
        save_torch_state({"step": 1}, tmp_path / "m" / "trainer_state.pt")
        (tmp_path / "m" / "plain.txt").write_text("x")  # what open() gives under this umask
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "m" / "plain.txt").stat().st_mode)
    assert want == 0o640
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == want, f"{f.name} must be written 0666 & ~umask, not mkstemp's 0600"
