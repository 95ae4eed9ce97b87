"""Qwen3-VL (dense) configuration, and `parse_config`, which reads any supported `config.json` by its model_type.

Layouts accepted (checked against transformers 5.24 `configuration_qwen3_vl.py` and the published
Qwen3-VL-2B/4B/8B Instruct and Thinking files, which were written by transformers 4.57):
  - 4.57 published files: `text_config` holds `rope_theta` and `rope_scaling = {"rope_type": "default",
    "mrope_section": [24, 20, 20], "mrope_interleaved": true}`; `vision_config.model_type` is "qwen3_vl" (sic).
  - transformers 5.x files: `text_config.rope_parameters = {"rope_type": "default", "rope_theta": ...,
    "mrope_section": [...], "mrope_interleaved": true}`, `vision_config.rope_parameters = {"rope_type": "axial",
    "rope_theta": 10000.0}`, plus PreTrainedConfig bookkeeping (`id2label`, `dtype`, ...).
Qwen3-VL's text head_dim is its own setting (128), not hidden_size / num_attention_heads (4B: 2560 / 32 = 80).
transformers always interleaves the M-RoPE frequencies for this architecture (`mrope_interleaved` is read by
nothing there), so `mrope_interleaved: false` is an error here rather than a second, untested layout.
Out of scope, and an error naming the setting: the MoE checkpoints (`qwen3_vl_moe`), Qwen3.5's hybrid linear
attention (`layer_types` other than full attention), attention bias or dropout, non-default RoPE scaling, and
quantised checkpoints (`quantization_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import METADATA_KEYS, QwenVLConfig, finish_text_checks, text_rope_settings

MODEL_TYPE = "qwen3_vl"
_TEXT_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "attention_dropout", "layer_types", "tie_word_embeddings", "use_sliding_window",
    "sliding_window",
}
_TOP_KEYS = {"text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
             "vision_end_token_id", "tie_word_embeddings"}
_VISION_KEYS = {
    "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size", "temporal_patch_size",
    "spatial_merge_size", "out_hidden_size", "num_position_embeddings", "deepstack_visual_indexes", "hidden_act",
    "rope_parameters", "rope_theta",
}


@dataclass
class Qwen3TextConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128  # hd, independent of D / heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)  # frequencies given to (t, h, w), interleaved
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None


@dataclass
class Qwen3VisionConfig:
    depth: int
    hidden_size: int  # ViT width C
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # merger output = text hidden size
    num_position_embeddings: int = 2304  # a square grid of learned position embeddings (48 x 48)
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)  # blocks whose outputs feed decoder layers 0, 1, ...
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def grid_side(self) -> int:
        return int(self.num_position_embeddings ** 0.5)


@dataclass
class Qwen3VLConfig:
    text: Qwen3TextConfig
    vision: Qwen3VisionConfig
    model_type: str = MODEL_TYPE
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"Qwen3VLConfig needs model_type {MODEL_TYPE!r}, got {self.model_type!r}")
        t, v = self.text, self.vision
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"text: heads {t.num_attention_heads} are not a multiple of kv heads "
                             f"{t.num_key_value_heads}")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
            raise ValueError(f"vision: hidden_size {v.hidden_size} / num_heads {v.num_heads} must be a multiple of 4")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if v.grid_side ** 2 != v.num_position_embeddings:
            raise ValueError(f"vision num_position_embeddings {v.num_position_embeddings} is not a square")
        ds = list(v.deepstack_visual_indexes)
        if any(not 0 <= i < v.depth for i in ds) or len(set(ds)) != len(ds):
            raise ValueError(f"deepstack_visual_indexes {ds} must be distinct blocks in [0, {v.depth})")
        if len(ds) > t.num_hidden_layers:
            raise ValueError(f"{len(ds)} DeepStack features but only {t.num_hidden_layers} decoder layers")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "Qwen3VLConfig":
        """Parse a Hugging Face Qwen3-VL config dict (4.57 or 5.x layout). `source` names the file in errors."""
        d = dict(d)
        if d.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}"
                             + (" (the MoE checkpoints are not supported)" if d.get("model_type") == "qwen3_vl_moe"
                                else ""))
        if "quantization_config" in d:
            raise ValueError(f"{source}: quantised checkpoints (quantization_config) are not supported")
        text = dict(d.get("text_config") or {})
        top_rest = {k: v for k, v in d.items() if k not in ("text_config",)}
        unknown = sorted(set(top_rest) - _TOP_KEYS - METADATA_KEYS)
        unknown += sorted(f"text_config.{k}" for k in set(text) - _TEXT_KEYS - METADATA_KEYS)
        vis = dict(d.get("vision_config") or {})
        unknown += sorted(f"vision_config.{k}" for k in set(vis) - _VISION_KEYS - METADATA_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown or unsupported config settings {unknown}")
        tc = _parse_text(text, source)
        vc = _parse_vision(vis, source)
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
               if k in d}
        return cls(text=tc, vision=vc, tie_word_embeddings=bool(tie), **ids)

    def to_dict(self) -> dict[str, Any]:
        """A config.json in the published layout (text_config / vision_config), which transformers 4.57+ loads."""
        t, v = self.text, self.vision
        text = {
            "model_type": "qwen3_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "hidden_act": t.hidden_act, "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings, "attention_bias": False, "attention_dropout": 0.0,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if t.pad_token_id is not None:
            text["pad_token_id"] = t.pad_token_id
        vis = {
            "model_type": "qwen3_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "out_hidden_size": v.out_hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "hidden_act": v.hidden_act,
        }
        if v.rope_theta != 10000.0:
            vis["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": MODEL_TYPE,
            "text_config": text, "vision_config": vis, "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
        }

    def replace(self, **kw) -> "Qwen3VLConfig":
        return dataclasses.replace(self, **kw)


def _parse_text(t: dict[str, Any], source: str) -> Qwen3TextConfig:
    problems = []
    if t.get("attention_bias"):
        problems.append("attention_bias=true (Qwen3-VL has no q/k/v/o bias)")
    lt = t.get("layer_types")
    if lt is not None and any(x != "full_attention" for x in lt):
        problems.append(f"layer_types={sorted(set(lt))} (only full attention; Qwen3.5's linear attention is out of "
                        "scope)")
    theta, rope = text_rope_settings(t, 5_000_000.0, problems)
    section = rope.pop("mrope_section", None) or (24, 20, 20)  # transformers' default when the file has none
    if not rope.pop("mrope_interleaved", True):
        problems.append("mrope_interleaved=false (transformers' Qwen3-VL always interleaves)")
    finish_text_checks(t, rope, problems, source)
    return Qwen3TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=theta, mrope_section=tuple(section),
        max_position_embeddings=t.get("max_position_embeddings", 262144),
        bos_token_id=t.get("bos_token_id", 151643), eos_token_id=t.get("eos_token_id", 151645),
        pad_token_id=t.get("pad_token_id"))


def _parse_vision(v: dict[str, Any], source: str) -> Qwen3VisionConfig:
    problems = []
    rope = dict(v.get("rope_parameters") or {})
    if rope.pop("rope_type", "axial") != "axial":
        problems.append("vision rope_parameters.rope_type must be 'axial'")
    theta = rope.pop("rope_theta", v.get("rope_theta", 10000.0))
    if rope:
        problems.append(f"unsupported vision rope settings {sorted(rope)}")
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu", "silu", "quick_gelu"):
        problems.append(f"vision hidden_act {act!r} is not supported")
    for k in ("patch_size", "temporal_patch_size"):
        if isinstance(v.get(k), (list, tuple)):
            problems.append(f"vision_config.{k}={v[k]} (only a single int is supported)")
    if problems:
        raise ValueError(f"{source}: unsupported config: " + "; ".join(problems))
    return Qwen3VisionConfig(
        depth=v.get("depth", 27), hidden_size=v.get("hidden_size", 1152), num_heads=v.get("num_heads", 16),
        intermediate_size=v.get("intermediate_size", 4304), out_hidden_size=v.get("out_hidden_size", 3584),
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
        patch_size=v.get("patch_size", 16), temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3), hidden_act=act,
        rope_theta=float(theta))


def parse_config(d: dict[str, Any], *, source: str = "config.json") -> QwenVLConfig | Qwen3VLConfig:
    """The config class for the file's model_type: Qwen2-VL / Qwen2.5-VL -> QwenVLConfig, Qwen3-VL ->
    Qwen3VLConfig."""
    if str(d.get("model_type", "")).startswith("qwen3"):  # qwen3_vl, or an unsupported sibling named in the error
        return Qwen3VLConfig.from_dict(d, source=source)
    return QwenVLConfig.from_dict(d, source=source)
