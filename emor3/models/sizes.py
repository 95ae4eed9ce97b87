"""Named Qwen-VL model sizes, built from every knob (the builder pattern of gpt-fast's `ModelArgs.from_name`).

`make_config` (Qwen2-VL / Qwen2.5-VL) and `make_qwen3_config` (Qwen3-VL) take every knob; `tiny_config(name)` calls
them with a named size's fixed numbers:
  - "tiny": trains on a 2-core CPU in minutes: text 128 wide, 4 layers, 4 heads / 2 kv heads; vision depth 2
    (block 1 full attention, block 0 windowed), patch 14, merge 2, 56-px windows (2x2 merged tokens), so a
    112x112 image gives 8x8 patches -> 16 merged tokens in 4 windows.
  - "100m": about 100M parameters at a 32k vocabulary (used by benchmarks/bench_model.py).
  - "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2-vl-2b": the published numbers (config only; weights come from
    `load_pretrained`).
  - Qwen3-VL (`NAMED_QWEN3`): "tiny-qwen3-vl" (and "tiny-qwen3-vl-thinking", the same model with the Thinking chat
    template): text 128 wide, head_dim 32, 4 layers; vision depth 2 with DeepStack from block 0, patch 16, an 8x8
    learned position table, so a 112x112 image gives 6x6 patches -> 9 merged tokens; "qwen3-vl-2b", "qwen3-vl-4b",
    "qwen3-vl-8b": the published numbers.
A tiny checkpoint folder (tokenizer, weights, processor files) is written by `emor3.toy.model`.
"""

from __future__ import annotations

from emor3.config import ModelSize, choices

from .config import QwenVLConfig, TextConfig, VisionConfig
from .config_qwen3_vl import Qwen3TextConfig, Qwen3VisionConfig, Qwen3VLConfig

# Qwen2-VL / Qwen2.5-VL special tokens, in the order of their ids in the released vocabulary (151643 ...)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

# Qwen3-VL's vocabulary continues with these after <|video_pad|> (ids 151657 ... 151668); <think> / </think> open
# and close a Thinking model's reasoning
QWEN3_EXTRA_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
QWEN3_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + QWEN3_EXTRA_TOKENS

def make_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                num_kv_heads: int, vision_depth: int, vision_hidden: int, vision_heads: int,
                vision_intermediate: int, fullatt_block_indexes: tuple[int, ...], window_size: int = 112,
                patch_size: int = 14, spatial_merge_size: int = 2, mrope_section: tuple[int, int, int] | None = None,
                rope_theta: float = 1e6, tie_word_embeddings: bool = True, model_type: str = "qwen2_5_vl",
                rms_norm_eps: float = 1e-6, max_position_embeddings: int = 32768,
                special_token_base: int | None = None) -> QwenVLConfig:
    """Every knob of a Qwen-VL config. mrope_section defaults to Qwen's 1/4, 3/8, 3/8 split of head_dim/2."""
    hd2 = hidden_size // num_heads // 2
    if mrope_section is None:
        t = hd2 // 4
        mrope_section = (t, (hd2 - t) // 2, hd2 - t - (hd2 - t) // 2)
    base = special_token_base if special_token_base is not None else vocab_size - len(QWEN_SPECIAL_TOKENS)
    sid = {tok: base + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
    text = TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      rms_norm_eps=rms_norm_eps, rope_theta=rope_theta, mrope_section=tuple(mrope_section),
                      max_position_embeddings=max_position_embeddings, bos_token_id=sid["<|endoftext|>"],
                      eos_token_id=sid["<|im_end|>"])
    act = "silu" if model_type == "qwen2_5_vl" else "quick_gelu"
    vision = VisionConfig(depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads,
                          intermediate_size=vision_intermediate, out_hidden_size=hidden_size, patch_size=patch_size,
                          spatial_merge_size=spatial_merge_size, hidden_act=act, window_size=window_size,
                          fullatt_block_indexes=tuple(fullatt_block_indexes) if model_type == "qwen2_5_vl" else ())
    return QwenVLConfig(text=text, vision=vision, model_type=model_type, tie_word_embeddings=tie_word_embeddings,
                        image_token_id=sid["<|image_pad|>"], video_token_id=sid["<|video_pad|>"],
                        vision_start_token_id=sid["<|vision_start|>"], vision_end_token_id=sid["<|vision_end|>"])


_QWEN_VOCAB = dict(vocab_size=151936, special_token_base=151643)
NAMED = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                 vision_depth=2, vision_hidden=64, vision_heads=2, vision_intermediate=128,
                 fullatt_block_indexes=(1,), window_size=56, rope_theta=10000.0),
    "100m": dict(vocab_size=32000, hidden_size=640, intermediate_size=1792, num_layers=14, num_heads=10,
                 num_kv_heads=2, vision_depth=8, vision_hidden=384, vision_heads=6, vision_intermediate=1024,
                 fullatt_block_indexes=(3, 7)),
    "qwen2.5-vl-3b": dict(**_QWEN_VOCAB, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
                          num_kv_heads=2, vision_depth=32, vision_hidden=1280, vision_heads=16,
                          vision_intermediate=3420, fullatt_block_indexes=(7, 15, 23, 31),
                          mrope_section=(16, 24, 24), max_position_embeddings=128000),
    "qwen2.5-vl-7b": dict(vocab_size=152064, special_token_base=151643, hidden_size=3584, intermediate_size=18944,
                          num_layers=28, num_heads=28, num_kv_heads=4, vision_depth=32, vision_hidden=1280,
                          vision_heads=16, vision_intermediate=3420, fullatt_block_indexes=(7, 15, 23, 31),
                          mrope_section=(16, 24, 24), tie_word_embeddings=False, max_position_embeddings=128000),
    "qwen2-vl-2b": dict(**_QWEN_VOCAB, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                        num_kv_heads=2, vision_depth=32, vision_hidden=1280, vision_heads=16,
                        vision_intermediate=5120, fullatt_block_indexes=(), mrope_section=(16, 24, 24),
                        model_type="qwen2_vl"),
}
NAMED["3b"], NAMED["7b"], NAMED["2b"] = NAMED["qwen2.5-vl-3b"], NAMED["qwen2.5-vl-7b"], NAMED["qwen2-vl-2b"]


def make_qwen3_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                      num_heads: int, num_kv_heads: int, head_dim: int, vision_depth: int, vision_hidden: int,
                      vision_heads: int, vision_intermediate: int, deepstack_visual_indexes: tuple[int, ...],
                      num_position_embeddings: int = 2304, patch_size: int = 16, spatial_merge_size: int = 2,
                      mrope_section: tuple[int, int, int] | None = None, rope_theta: float = 5e6,
                      tie_word_embeddings: bool = True, rms_norm_eps: float = 1e-6,
                      max_position_embeddings: int = 262144, special_token_base: int | None = None) -> Qwen3VLConfig:
    """Every knob of a Qwen3-VL config. mrope_section defaults to Qwen3-VL's 24/20/20 split of 64, scaled."""
    hd2 = head_dim // 2
    if mrope_section is None:
        s = hd2 * 20 // 64
        mrope_section = (hd2 - 2 * s, s, s)
    base = special_token_base if special_token_base is not None else vocab_size - len(QWEN3_SPECIAL_TOKENS)
    sid = {tok: base + i for i, tok in enumerate(QWEN3_SPECIAL_TOKENS)}
    text = Qwen3TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=num_kv_heads, head_dim=head_dim, rms_norm_eps=rms_norm_eps,
                           rope_theta=rope_theta, mrope_section=tuple(mrope_section),
                           max_position_embeddings=max_position_embeddings, bos_token_id=sid["<|endoftext|>"],
                           eos_token_id=sid["<|im_end|>"])
    vision = Qwen3VisionConfig(depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads,
                               intermediate_size=vision_intermediate, out_hidden_size=hidden_size,
                               num_position_embeddings=num_position_embeddings,
                               deepstack_visual_indexes=tuple(deepstack_visual_indexes), patch_size=patch_size,
                               spatial_merge_size=spatial_merge_size)
    return Qwen3VLConfig(text=text, vision=vision, tie_word_embeddings=tie_word_embeddings,
                         image_token_id=sid["<|image_pad|>"], video_token_id=sid["<|video_pad|>"],
                         vision_start_token_id=sid["<|vision_start|>"], vision_end_token_id=sid["<|vision_end|>"])


# Qwen3-VL: the published Qwen3-VL-{2B,4B,8B}-{Instruct,Thinking} config.json numbers (Thinking = Instruct here)
_QWEN3_VISION_SMALL = dict(vision_depth=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
                           deepstack_visual_indexes=(5, 11, 17))
_QWEN3_COMMON = dict(vocab_size=151936, special_token_base=151643, head_dim=128, num_kv_heads=8)
NAMED_QWEN3 = {
    # trains on a 2-core CPU: text 128 wide, head_dim 32 (!= 128 / 4 heads, as in the real sizes), 4 layers;
    # vision depth 2 with DeepStack from block 0, patch 16, merge 2, an 8x8 learned position table
    "tiny-qwen3-vl": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=32, vision_depth=2, vision_hidden=64, vision_heads=2,
                          vision_intermediate=128, deepstack_visual_indexes=(0,), num_position_embeddings=64,
                          rope_theta=10000.0),
    "qwen3-vl-2b": dict(**_QWEN3_COMMON, **_QWEN3_VISION_SMALL, hidden_size=2048, intermediate_size=6144,
                        num_layers=28, num_heads=16),
    "qwen3-vl-4b": dict(**_QWEN3_COMMON, **_QWEN3_VISION_SMALL, hidden_size=2560, intermediate_size=9728,
                        num_layers=36, num_heads=32),
    "qwen3-vl-8b": dict(**_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                        vision_depth=27, vision_hidden=1152, vision_heads=16, vision_intermediate=4304,
                        deepstack_visual_indexes=(8, 16, 24), tie_word_embeddings=False),
}
# the same tiny model with the Thinking chat template (build_tiny_checkpoint reads the suffix)
NAMED_QWEN3["tiny-qwen3-vl-thinking"] = NAMED_QWEN3["tiny-qwen3-vl"]
assert set(NAMED) | set(NAMED_QWEN3) == set(choices(ModelSize)), "ModelSize (emor3.config) names every size"


def tiny_config(name: str = "tiny", **overrides) -> QwenVLConfig | Qwen3VLConfig:
    if name in NAMED_QWEN3:
        return make_qwen3_config(**{**NAMED_QWEN3[name], **overrides})
    if name not in NAMED:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(NAMED) + sorted(NAMED_QWEN3)}")
    return make_config(**{**NAMED[name], **overrides})
