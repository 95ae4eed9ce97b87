"""Qwen2-VL / Qwen2.5-VL configuration: parsed from any `config.json` seen in the wild, written back as one
that transformers loads.

Layouts accepted (checked against transformers 5.24 `configuration_qwen2_vl.py` / `configuration_qwen2_5_vl.py`
and the published Qwen2-VL-2B/7B-Instruct and Qwen2.5-VL-3B/7B-Instruct files):
  - transformers 4.x published files: text settings at the top level, `rope_theta` at the top level,
    `rope_scaling = {"type": "mrope", "mrope_section": [...]}`, vision `in_chans` (and `spatial_patch_size`).
  - transformers 5.x files: nested `text_config`, `rope_parameters = {"rope_type": "default", "rope_theta": ...,
    "mrope_section": [...]}`, vision `in_channels`, vision `rope_parameters = {"rope_type": "axial", ...}`.
Qwen2-VL's vision config names differ from Qwen2.5-VL's: `embed_dim` is the ViT width, `hidden_size` the merger
output width, `mlp_ratio` the MLP ratio; we normalise both onto `VisionConfig` (width `hidden_size`, output
`out_hidden_size`, `intermediate_size`).

Settings we do not implement (sliding-window attention, attention dropout, non-default RoPE scaling, `layer_types`
other than full attention) are an error naming them, as is any key we do not know: a silently ignored setting
is a silently different model. Pure metadata keys (`architectures`, `torch_dtype`, `transformers_version`, ...)
are accepted and dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Keys that carry no model semantics (PreTrainedConfig bookkeeping, generation defaults, hub metadata).
METADATA_KEYS = {
    "_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder",
    "output_attentions", "output_hidden_states", "problem_type", "return_dict", "model_type",
    "_attn_implementation_autoset", "_attn_implementation", "tokenizer_class", "pad_token_id", "bos_token_id",
    "eos_token_id", "vision_token_id", "max_window_layers", "max_position_embeddings", "tie_encoder_decoder",
    "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss", "add_cross_attention", "cross_attention_hidden_size",
    "decoder_start_token_id", "sep_token_id", "finetuning_task", "task_specific_params", "prefix",
    "tokens_per_second",
}
_TEXT_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_dropout", "use_sliding_window", "sliding_window", "layer_types", "head_dim", "tie_word_embeddings",
}
_TOP_KEYS = {"text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
             "vision_end_token_id", "tie_word_embeddings"}
_VISION_KEYS = {
    "depth", "hidden_size", "embed_dim", "out_hidden_size", "intermediate_size", "mlp_ratio", "num_heads",
    "in_chans", "in_channels", "patch_size", "spatial_patch_size", "temporal_patch_size", "spatial_merge_size",
    "hidden_act", "window_size", "fullatt_block_indexes", "rope_parameters", "rope_theta",
}
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # halves of head_dim given to (t, h, w)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int  # ViT width (Qwen2-VL calls it embed_dim)
    num_heads: int
    intermediate_size: int  # ViT MLP width (Qwen2-VL: embed_dim * mlp_ratio)
    out_hidden_size: int  # merger output = text hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "silu"  # Qwen2-VL: quick_gelu
    window_size: int = 112  # Qwen2.5-VL only: window side in pixels
    fullatt_block_indexes: tuple[int, ...] = ()  # Qwen2.5-VL only
    tokens_per_second: int = 2  # Qwen2.5-VL video: temporal M-RoPE ids per second of clip (published value)
    rope_theta: float = 10000.0


@dataclass
class QwenVLConfig:
    text: TextConfig
    vision: VisionConfig
    model_type: str = "qwen2_5_vl"
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"text: hidden_size {t.hidden_size}, heads {t.num_attention_heads}, kv heads "
                             f"{t.num_key_value_heads} do not divide")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
            raise ValueError(f"vision: hidden_size {v.hidden_size} / num_heads {v.num_heads} must be a multiple of 4")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if self.model_type == "qwen2_5_vl":
            bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
            if bad:
                raise ValueError(f"fullatt_block_indexes {bad} out of range for depth {v.depth}")
            if v.window_size % (v.patch_size * v.spatial_merge_size):
                raise ValueError(f"window_size {v.window_size} is not a multiple of patch*merge")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "QwenVLConfig":
        """Parse a Hugging Face config dict (4.x or 5.x layout). `source` names the file in errors."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")
        if "text_config" in d and isinstance(d["text_config"], dict):
            text = dict(d["text_config"])
            # a 5.x file may still carry a few text keys at the top level (e.g. vocab_size); text_config wins
            top_text = {k: d[k] for k in _TEXT_KEYS if k in d}
            text = {**top_text, **text}
            top_rest = {k: v for k, v in d.items() if k not in _TEXT_KEYS}
        else:  # 4.x: text settings at the top level
            text = {k: v for k, v in d.items() if k in _TEXT_KEYS or k in METADATA_KEYS}
            top_rest = {k: v for k, v in d.items() if k not in _TEXT_KEYS}
        unknown = sorted(set(top_rest) - _TOP_KEYS - METADATA_KEYS)
        unknown += sorted(f"text_config.{k}" for k in set(text) - _TEXT_KEYS - METADATA_KEYS)
        vis = dict(d.get("vision_config") or {})
        unknown += sorted(f"vision_config.{k}" for k in set(vis) - _VISION_KEYS - METADATA_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown or unsupported config settings {unknown}")
        tc = _parse_text(text, source)
        vc = _parse_vision(vis, model_type, source)
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
               if k in d}
        return cls(text=tc, vision=vc, model_type=model_type, tie_word_embeddings=bool(tie), **ids)

    def to_dict(self) -> dict[str, Any]:
        """A config.json in the published (transformers 4.x) layout, which both 4.x and 5.x load."""
        t, v = self.text, self.vision
        arch = "Qwen2VLForConditionalGeneration" if self.model_type == "qwen2_vl" else \
            "Qwen2_5_VLForConditionalGeneration"
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "attention_dropout": 0.0,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "vocab_size": t.vocab_size,
        }
        if t.pad_token_id is not None:
            out["pad_token_id"] = t.pad_token_id
        if self.model_type == "qwen2_vl":
            if v.intermediate_size % v.hidden_size:
                raise ValueError("qwen2_vl vision intermediate_size must be embed_dim * integer mlp_ratio")
            vis = {"depth": v.depth, "embed_dim": v.hidden_size, "hidden_size": v.out_hidden_size,
                   "mlp_ratio": v.intermediate_size // v.hidden_size, "hidden_act": v.hidden_act,
                   "num_heads": v.num_heads}
        else:
            vis = {"depth": v.depth, "hidden_size": v.hidden_size, "out_hidden_size": v.out_hidden_size,
                   "intermediate_size": v.intermediate_size, "hidden_act": v.hidden_act, "num_heads": v.num_heads,
                   "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                   "tokens_per_second": v.tokens_per_second}
        vis.update({"in_chans": v.in_channels, "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
                    "temporal_patch_size": v.temporal_patch_size})
        if v.rope_theta != 10000.0:
            vis["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
        out["vision_config"] = vis
        return out

    def replace(self, **kw) -> "QwenVLConfig":
        return dataclasses.replace(self, **kw)


def text_rope_settings(t: dict[str, Any], default_theta: float, problems: list[str]) -> tuple[float, dict]:
    """(rope theta, the rope settings not yet read) of a Qwen text config, after the checks every Qwen-VL text
    decoder here shares: no attention dropout, no sliding window, default M-RoPE. Problems are appended."""
    if t.get("attention_dropout", 0.0) not in (0, 0.0, None):
        problems.append(f"attention_dropout={t['attention_dropout']} (only 0 is supported)")
    if t.get("use_sliding_window"):
        problems.append("use_sliding_window=true (sliding-window attention is not implemented)")
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if rope_type not in ("default", "mrope"):
        problems.append(f"rope type {rope_type!r} (only default M-RoPE is supported)")
    theta = rope.pop("rope_theta", None) or t.get("rope_theta", default_theta)
    return float(theta), rope


def finish_text_checks(t: dict[str, Any], rope: dict, problems: list[str], source: str) -> None:
    """The shared last checks of a Qwen text config, once the caller has taken the rope settings it reads out of
    ``rope``: nothing else left in it, the required sizes present, a SiLU MLP. Raises with every problem found."""
    if rope.get("partial_rotary_factor", 1.0) == 1.0:
        rope.pop("partial_rotary_factor", None)
    if rope:
        problems.append(f"unsupported rope settings {sorted(rope)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in t]
    if missing:
        problems.append(f"missing text settings {missing}")
    if t.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={t['hidden_act']!r} (text MLP must be silu)")
    if problems:
        raise ValueError(f"{source}: unsupported config: " + "; ".join(problems))


def _parse_text(t: dict[str, Any], source: str) -> TextConfig:
    problems = []
    lt = t.get("layer_types")
    if lt is not None and any(x != "full_attention" for x in lt):
        problems.append(f"layer_types={sorted(set(lt))} (only full_attention is supported)")
    theta, rope = text_rope_settings(t, 1_000_000.0, problems)
    section = rope.pop("mrope_section", None)
    if section is None:
        problems.append("rope_scaling/rope_parameters.mrope_section is missing")
    if "head_dim" in t and t["head_dim"] != t["hidden_size"] // t["num_attention_heads"]:
        problems.append(f"head_dim={t['head_dim']} != hidden_size/num_attention_heads")
    finish_text_checks(t, rope, problems, source)
    return TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=theta, mrope_section=tuple(section),
        max_position_embeddings=t.get("max_position_embeddings", 32768),
        bos_token_id=t.get("bos_token_id", 151643), eos_token_id=t.get("eos_token_id", 151645),
        pad_token_id=t.get("pad_token_id"))


def _parse_vision(v: dict[str, Any], model_type: str, source: str) -> VisionConfig:
    problems = []
    in_ch = v.get("in_channels", v.get("in_chans", 3))
    patch = v.get("patch_size", v.get("spatial_patch_size", 14))
    if "spatial_patch_size" in v and v["spatial_patch_size"] != patch:
        problems.append(f"spatial_patch_size {v['spatial_patch_size']} != patch_size {patch}")
    rope = dict(v.get("rope_parameters") or {})
    if rope.pop("rope_type", "axial") != "axial":
        problems.append("vision rope_parameters.rope_type must be 'axial'")
    theta = rope.pop("rope_theta", v.get("rope_theta", 10000.0))
    if rope:
        problems.append(f"unsupported vision rope settings {sorted(rope)}")
    if model_type == "qwen2_vl":
        for k in ("out_hidden_size", "intermediate_size", "window_size", "fullatt_block_indexes"):
            if k in v:
                problems.append(f"vision_config.{k} is a Qwen2.5-VL setting, not valid for qwen2_vl")
        embed = v.get("embed_dim", 1280)
        kw = dict(depth=v.get("depth", 32), hidden_size=embed, num_heads=v.get("num_heads", 16),
                  intermediate_size=int(embed * v.get("mlp_ratio", 4)), out_hidden_size=v.get("hidden_size", 3584),
                  hidden_act=v.get("hidden_act", "quick_gelu"))
    else:
        for k in ("embed_dim", "mlp_ratio"):
            if k in v:
                problems.append(f"vision_config.{k} is a Qwen2-VL setting, not valid for qwen2_5_vl")
        kw = dict(depth=v.get("depth", 32), hidden_size=v.get("hidden_size", 1280), num_heads=v.get("num_heads", 16),
                  intermediate_size=v.get("intermediate_size", 3420), out_hidden_size=v.get("out_hidden_size", 3584),
                  hidden_act=v.get("hidden_act", "silu"), window_size=v.get("window_size", 112),
                  fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
                  # a file without it means what transformers reads it as (4); the published files say 2
                  tokens_per_second=v.get("tokens_per_second", 4))
    if kw["hidden_act"] not in ("silu", "quick_gelu", "gelu"):
        problems.append(f"vision hidden_act {kw['hidden_act']!r} is not supported")
    if problems:
        raise ValueError(f"{source}: unsupported config: " + "; ".join(problems))
    return VisionConfig(patch_size=patch, temporal_patch_size=v.get("temporal_patch_size", 2),
                        spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=in_ch,
                        rope_theta=float(theta), **kw)
