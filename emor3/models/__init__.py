"""Qwen2-VL / Qwen2.5-VL in pure PyTorch: model, M-RoPE positions, checkpoint IO, prompt processing, tiny builder."""

from .config import QwenVLConfig, TextConfig, VisionConfig
from .positions import decode_position_ids, mrope_position_ids, text_position_ids
from .qwen_vl import KVCache, QwenVL

__all__ = ["QwenVL", "QwenVLConfig", "TextConfig", "VisionConfig", "KVCache", "mrope_position_ids",
           "decode_position_ids", "text_position_ids"]
