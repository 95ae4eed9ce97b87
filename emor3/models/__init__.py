"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL in pure PyTorch: model, M-RoPE positions, checkpoint IO, prompt processing,
clips, named sizes."""

from .checkpoint import load_pretrained, save_pretrained
from .config import QwenVLConfig, TextConfig, VisionConfig
from .config_qwen3_vl import Qwen3TextConfig, Qwen3VisionConfig, Qwen3VLConfig, parse_config
from .positions import decode_position_ids, mrope_position_ids, text_position_ids, video_rope_grids
from .processing import Processor, PromptBatch
from .qwen3_vl import Qwen3VL
from .qwen_vl import KVCache, QwenVL
from .sizes import tiny_config
from .video import Clip, VideoSettings, preprocess_clips, read_clip

__all__ = ["QwenVL", "QwenVLConfig", "Qwen3VL", "Qwen3VLConfig", "Qwen3TextConfig", "Qwen3VisionConfig",
           "parse_config", "TextConfig", "VisionConfig", "KVCache", "load_pretrained", "save_pretrained",
           "Processor", "PromptBatch", "mrope_position_ids", "decode_position_ids", "text_position_ids",
           "tiny_config", "video_rope_grids", "Clip",
           "VideoSettings", "read_clip", "preprocess_clips"]
