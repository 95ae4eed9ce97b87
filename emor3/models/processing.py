"""Prompt processing: chat messages + PIL images -> a left-padded `PromptBatch` with M-RoPE positions.

Everything that defines the model's input comes from transformers' own code, not a re-implementation:
  - the chat template through the tokenizer's `apply_chat_template` (the template from the checkpoint);
  - resizing, rescaling, normalising and patch flattening through `Qwen2VLImageProcessorPil` (the PIL backend, so
    torchvision is not needed; transformers' `AutoProcessor` may silently return only the tokenizer when the
    torchvision-backed processor cannot be built, and `Qwen2VLProcessor` also wants a video processor);
  - tokenisation through the tokenizer.
The one step done here is the one `Qwen2VLProcessor.__call__` does: each `<|image_pad|>` of the template is
expanded to t*h*w / merge^2 copies, the number of merged tokens the vision tower makes for that image.

Qwen3-VL goes through the same path: its processor (`Qwen3VLProcessor`) expands image slots the same way and uses
the same image processor class (16-px patches, mean = std = 0.5, from the checkpoint's preprocessor_config.json).
Thinking models (Qwen3-VL-*-Thinking) open a reasoning block in the generation prompt (`...assistant\n<think>\n`);
`Processor.thinking` says so (read off the chat template), `encode_prompts(..., close_thinking=True)` appends the
template's no-thinking form (an empty block, `\n</think>\n\n`) for replies that must start at once (the RER judge,
Cold-Start SFT targets), and `answer(completion)` is the text after `</think>`, which the rewards score.

Clips (`videos_list`: `Clip`s or paths `read_clip` reads) are preprocessed by `emor3.models.video` (transformers' video
processor rules, our own code) and each `<|video_pad|>` slot of the template is expanded as transformers 5.24's
processors do: Qwen2-VL / Qwen2.5-VL to the clip's t*h*w / merge^2 video tokens; Qwen3-VL to, per temporal patch,
`<t.t seconds><|vision_start|>` + h*w / merge^2 video tokens + `<|vision_end|>` (inside the template's own
`<|vision_start|>...<|vision_end|>`, which 5.24 keeps). Their M-RoPE ids follow `positions.video_rope_grids`
(Qwen2.5-VL: absolute time from each clip's seconds per temporal patch and the config's `tokens_per_second`).

Truncation: prompts longer than `max_prompt_length` lose tokens on the left (the system prompt end first), unless
that would cut an image's tokens; then the prompt is rejected with an error naming the sample, never truncated.

Shape legend: B prompts, P prompt length (padded), I images in the batch, V clips in the batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .positions import mrope_position_ids, video_rope_grids
from .video import (Clip, ProcessedClips, VideoSettings, patch_timestamps, preprocess_clips, read_clip, resized_hw,
                    sample_indices)


@dataclass
class PromptBatch:
    input_ids: Tensor  # (B, P) long, left-padded
    attention_mask: Tensor  # (B, P) long, 0 on padding
    position_ids: Tensor  # (3, B, P) long, M-RoPE ids (0 on padding)
    pixel_values: Tensor | None  # (num_patches, C*t*p*p) float, all images in row-major order
    image_grid_thw: Tensor | None  # (I, 3) long, patch grid per image
    next_position: Tensor  # (B,) long, M-RoPE id (all 3 axes) of the first generated token
    num_images: list[int] = field(default_factory=list)  # images per prompt (B entries)
    pixel_values_videos: Tensor | None = None  # (video patches, C*t*p*p) float, all clips in row-major order
    video_grid_thw: Tensor | None = None  # (V, 3) long, temporal patches x patch rows x patch columns per clip
    second_per_grid_ts: Tensor | None = None  # (V,) float32 seconds per temporal patch (Qwen2.5-VL's M-RoPE time)
    num_videos: list[int] = field(default_factory=list)  # clips per prompt (B entries; empty when none anywhere)

    def to(self, device) -> "PromptBatch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.position_ids), mv(self.pixel_values),
                           mv(self.image_grid_thw), mv(self.next_position), list(self.num_images),
                           mv(self.pixel_values_videos), mv(self.video_grid_thw), mv(self.second_per_grid_ts),
                           list(self.num_videos))

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


VIDEO_PLACEHOLDER = "<|video_placeholder|>"  # stands for a video token while slots are expanded
VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class Processor:
    """Tokenizer + Qwen2-VL PIL image processor (also Qwen3-VL's) + clip preprocessing (`emor3.models.video`).
    `min_pixels` / `max_pixels` override the image pixel budget, `video_settings` the clips'."""

    def __init__(self, tokenizer, image_processor, *, max_prompt_length: int | None = None,
                 model_type: str | None = None, video_settings: VideoSettings | None = None,
                 tokens_per_second: float = 2.0):
        """`model_type` ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"; `from_pretrained` reads it from config.json) decides
        how clips are laid out; `video_settings` default to that family's (`VideoSettings.for_model`) with the
        image processor's patch, merge, mean and std; `tokens_per_second`: Qwen2.5-VL's M-RoPE time scale."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_prompt_length = max_prompt_length
        self.model_type = model_type
        self.tokens_per_second = tokens_per_second
        if video_settings is None and model_type is not None:
            video_settings = VideoSettings.for_model(model_type, **self.image_defaults(image_processor))
        if video_settings is not None:
            ip = image_processor
            theirs = (ip.patch_size, ip.merge_size, ip.temporal_patch_size)
            mine = (video_settings.patch_size, video_settings.merge_size, video_settings.temporal_patch_size)
            if mine != theirs:
                raise ValueError(f"video settings (patch, merge, temporal patch) {mine} differ from the image "
                                 f"processor's {theirs}: the vision tower takes one patch size")
        self.video_settings = video_settings
        ids = tokenizer.convert_tokens_to_ids
        self.image_token = "<|image_pad|>"
        self.image_token_id = ids(self.image_token)
        self.video_token = "<|video_pad|>"
        self.video_token_id = ids(self.video_token)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids("<|endoftext|>")
        self.stop_token_ids = tuple(ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
        self.banned_token_ids = tuple(ids(t) for t in VISION_SPECIALS)
        self.vision_token_ids = frozenset(self.banned_token_ids)
        self.merge_size = image_processor.merge_size
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                              add_generation_prompt=True) if tokenizer.chat_template else ""
        self.thinking = probe.rstrip().endswith(THINK_OPEN)  # a Thinking model's template opens the block

    def set_clip_budget(self, *, fps: float | None, max_frames: int, min_pixels: int, max_pixels: int) -> None:
        """Sample clips at `fps` frames per second (None: every frame), at most `max_frames` of them, and resize
        every frame into [min_pixels, max_pixels] (a run's `--model.video-*` settings, beside the image budget).
        Qwen3-VL's video processor bounds the whole clip, so there each frame is capped at `max_pixels` through its
        per-frame token cap instead. Patch sizes, mean and std stay the checkpoint's."""
        s = self.video_settings
        if s is None:
            return  # no model type: clips are refused with a message when given
        f = s.factor
        kw = dict(fps=fps, max_frames=max_frames, min_frames=min(s.min_frames, max_frames))
        if s.family == "qwen2":
            kw.update(min_pixels=min_pixels, max_pixels=max_pixels)
        else:
            kw.update(min_pixels=min_pixels, max_pixels=max_pixels * max_frames, cap_pixels_per_frame=True,
                      max_video_tokens=max(1, max_pixels // (f * f)))
        self.video_settings = replace(s, **kw)

    @staticmethod
    def image_defaults(image_processor) -> dict:
        """The video settings that follow the image processor: patch sizes (one vision tower), mean and std."""
        ip = image_processor
        return dict(patch_size=ip.patch_size, merge_size=ip.merge_size, temporal_patch_size=ip.temporal_patch_size,
                    image_mean=tuple(ip.image_mean), image_std=tuple(ip.image_std))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None,
                        max_prompt_length: int | None = None,
                        video_settings: VideoSettings | None = None) -> "Processor":
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = Path(path)
        tok = AutoTokenizer.from_pretrained(path)
        if tok.chat_template is None:
            # released Qwen folders may keep the template beside the processor, not in tokenizer_config.json
            for name in ("chat_template.jinja", "chat_template.json"):
                f = path / name
                if f.is_file():
                    text = f.read_text()
                    tok.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                    break
            else:
                raise ValueError(f"{path}: the tokenizer has no chat template and no chat_template file exists")
        kw = {}
        if min_pixels is not None:
            kw["min_pixels"] = min_pixels
        if max_pixels is not None:
            kw["max_pixels"] = max_pixels
        if not (path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{path}: preprocessor_config.json is missing")
        improc = Qwen2VLImageProcessorPil.from_pretrained(path, **kw)
        model_type, tps = None, 2.0
        if (path / "config.json").is_file():
            cfg = json.loads((path / "config.json").read_text())
            model_type = cfg.get("model_type")
            tps = (cfg.get("vision_config") or {}).get("tokens_per_second", 4)  # transformers' default, as config.py
        if model_type not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            model_type = None  # clips are refused, images work as before
        vfile = path / "video_preprocessor_config.json"
        if video_settings is None and model_type is not None and vfile.is_file():
            # a file whose patch sizes disagree with the image processor's is an error (checked in __init__)
            video_settings = VideoSettings.from_dict(model_type, json.loads(vfile.read_text()), source=str(vfile),
                                                     defaults=cls.image_defaults(improc))
        return cls(tok, improc, max_prompt_length=max_prompt_length, model_type=model_type,
                   video_settings=video_settings, tokens_per_second=tps)

    def decode(self, ids, skip_special_tokens: bool = True):
        """Text of one sequence (1-D) or a list of texts (2-D / list of lists)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def answer(self, completion: str) -> str:
        """The part of a completion that is scored: for a Thinking model the text after the first `</think>`
        ("" while the block is unclosed, so a reply that never stops reasoning earns no format or accuracy
        reward); otherwise the completion itself."""
        if not self.thinking:
            return completion
        i = completion.find(THINK_CLOSE)
        return completion[i + len(THINK_CLOSE):].lstrip() if i >= 0 else ""

    def encode_prompts(self, messages_list: list[list[dict]], images_list: list[list] | None = None, *,
                       close_thinking: bool = False, videos_list: list[list] | None = None) -> PromptBatch:
        """Chat messages (one list per prompt), their PIL images and their clips (one list per prompt each) ->
        PromptBatch. A clip is a `Clip` or anything `read_clip` reads (a folder of frames, a GIF, ...).

        A `Clip` inside an image list is that prompt's clip (as if given in `videos_list`, in order): the callers
        that pass one visual per prompt (dataset samples, judge requests) pass images and clips alike.

        `close_thinking`: for a Thinking model, end each prompt with an empty reasoning block (no effect
        otherwise)."""
        B = len(messages_list)
        images_list = images_list if images_list is not None else [[] for _ in range(B)]
        if len(images_list) != B:
            raise ValueError(f"{B} prompts but {len(images_list)} image lists")
        images_list, videos_list = self._route_clips(images_list, videos_list)
        flat_images, counts = [], []
        for i, imgs in enumerate(images_list):
            imgs = [] if imgs is None else (list(imgs) if isinstance(imgs, (list, tuple)) else [imgs])
            counts.append(len(imgs))
            flat_images += imgs
        pixel_values = grid = None
        if flat_images:
            # an image object that several prompts share (the G judge prompts of a group) is preprocessed once
            unique, slot, first = [], [], {}
            for im in flat_images:
                if id(im) not in first:
                    first[id(im)] = len(unique)
                    unique.append(im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im)
                slot.append(first[id(im)])
            out = self.image_processor(images=unique, return_tensors="pt")
            pixel_values = out["pixel_values"]  # (patches, C*t*p*p)
            grid = out["image_grid_thw"].long()  # (I, 3)
            if len(unique) < len(flat_images):  # the patches of image slot[j], in prompt order
                sizes = grid.prod(-1)
                starts = torch.cumsum(sizes, 0) - sizes
                pixel_values = torch.cat([pixel_values[starts[k] : starts[k] + sizes[k]] for k in slot])
                grid = grid[slot]
        n_tokens = (grid.prod(-1) // self.merge_size ** 2).tolist() if grid is not None else []
        clips, v_counts = self._clips(videos_list, B)
        v_texts = [self._video_text(clips, j) for j in range(len(clips.timestamps))] if clips is not None else []
        rows, k, kv = [], 0, 0
        for i, msgs in enumerate(messages_list):
            ids = self._prompt_ids(msgs, n_tokens[k:k + counts[i]], i, close_thinking,
                                   v_texts[kv:kv + (v_counts[i] if v_counts else 0)])
            k += counts[i]
            kv += v_counts[i] if v_counts else 0
            rows.append(self._truncate(ids, i))
        P = max(len(r) for r in rows)
        input_ids = torch.full((B, P), self.pad_token_id, dtype=torch.long)  # (B, P)
        attention_mask = torch.zeros(B, P, dtype=torch.long)  # (B, P)
        for i, r in enumerate(rows):
            input_ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, P - len(r):] = 1
        n_found = int((input_ids == self.image_token_id).sum())
        if n_found != sum(n_tokens):
            raise ValueError(f"tokenised prompts hold {n_found} image tokens, the images need {sum(n_tokens)} "
                             "(the tokenizer split <|image_pad|>?)")
        v_grid = spg = v_pix = None
        rope_grids = steps = None
        if clips is not None:
            v_pix, v_grid = clips.pixel_values_videos, clips.video_grid_thw  # (patches, C*t*p*p), (V, 3)
            spg = torch.tensor(clips.second_per_grid_ts, dtype=torch.float32)  # (V,)
            n_vid = int((input_ids == self.video_token_id).sum())
            if n_vid != sum(clips.tokens(self.merge_size)):
                raise ValueError(f"tokenised prompts hold {n_vid} video tokens, the clips need "
                                 f"{sum(clips.tokens(self.merge_size))} (the tokenizer split <|video_pad|>?)")
            rope_grids, steps = video_rope_grids(self.model_type, v_grid, spg, tokens_per_second=self.tokens_per_second)
        position_ids, next_position = mrope_position_ids(input_ids, attention_mask, grid,
                                                         image_token_id=self.image_token_id,
                                                         spatial_merge_size=self.merge_size,
                                                         video_grid_thw=rope_grids, video_token_id=self.video_token_id,
                                                         video_steps=steps)
        return PromptBatch(input_ids, attention_mask, position_ids, pixel_values, grid, next_position, counts,
                           v_pix, v_grid, spg, v_counts)

    @staticmethod
    def _route_clips(images_list: list, videos_list: list[list] | None) -> tuple[list, list[list] | None]:
        """The image lists without their `Clip`s, and the clip lists with them (a prompt gives its clips in one of
        the two lists, not both)."""
        listed = [[] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v]) for v in images_list]
        if not any(isinstance(v, Clip) for vs in listed for v in vs):
            return images_list, videos_list
        images = [[v for v in vs if not isinstance(v, Clip)] for vs in listed]
        clips = [[v for v in vs if isinstance(v, Clip)] for vs in listed]
        if videos_list is not None:
            for i, (mine, given) in enumerate(zip(clips, videos_list)):
                if mine and given:
                    raise ValueError(f"prompt {i}: clips in both its image list and its clip list; give them in one")
            clips = [mine or ([] if given is None else given) for mine, given in zip(clips, videos_list)]
        return images, clips

    def _clips(self, videos_list: list[list] | None, B: int) -> tuple[ProcessedClips | None, list[int]]:
        """All prompts' clips preprocessed in prompt order (a clip object shared by prompts is read and processed
        once), and the clips per prompt ([] when no prompt has one)."""
        if videos_list is None:
            return None, []
        if len(videos_list) != B:
            raise ValueError(f"{B} prompts but {len(videos_list)} clip lists")
        flat, counts = [], []
        for vids in videos_list:
            vids = [] if vids is None else (list(vids) if isinstance(vids, (list, tuple)) else [vids])
            counts.append(len(vids))
            flat += vids
        if not flat:
            return None, []
        if self.model_type is None or self.video_settings is None:
            raise ValueError("Processor: clips need the model type (build the processor with from_pretrained on a "
                             "folder with config.json, or pass model_type=)")
        unique, slot, first = [], [], {}
        for v in flat:
            if id(v) not in first:
                first[id(v)] = len(unique)
                unique.append(v if isinstance(v, Clip) else read_clip(v))
            slot.append(first[id(v)])
        done = preprocess_clips(unique, self.video_settings)
        if len(unique) < len(flat):  # the patches of clip slot[j], in prompt order
            sizes = done.video_grid_thw.prod(-1)
            starts = torch.cumsum(sizes, 0) - sizes
            done = ProcessedClips(torch.cat([done.pixel_values_videos[starts[k]:starts[k] + sizes[k]] for k in slot]),
                                  done.video_grid_thw[slot], [done.second_per_grid_ts[k] for k in slot],
                                  [done.timestamps[k] for k in slot], [done.frame_indices[k] for k in slot])
        return done, counts

    def _video_text(self, clips: ProcessedClips, j: int) -> str:
        """What clip j's `<|video_pad|>` slot becomes (transformers 5.24's `replace_video_token`)."""
        t, h, w = clips.video_grid_thw[j].tolist()
        per_frame = h * w // self.merge_size ** 2
        if self.model_type != "qwen3_vl":
            return VIDEO_PLACEHOLDER * (t * per_frame)
        return "".join(f"<{sec:.1f} seconds><|vision_start|>{VIDEO_PLACEHOLDER * per_frame}<|vision_end|>"
                       for sec in clips.timestamps[j])

    def _prompt_ids(self, msgs: list[dict], image_tokens: list[int], i: int, close_thinking: bool,
                    video_texts: list[str] = ()) -> list[int]:
        """Token ids of prompt i: the chat template, each image slot expanded to its merged-token count and each
        clip slot to its text (`_video_text`)."""
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if close_thinking and self.thinking:
            text += "\n" + THINK_CLOSE + "\n\n"
        n_slots = text.count(self.image_token)
        if n_slots != len(image_tokens):
            raise ValueError(f"prompt {i}: the messages hold {n_slots} image slots but {len(image_tokens)} images "
                             "were given")
        n_vslots = text.count(self.video_token)
        if n_vslots != len(video_texts):
            raise ValueError(f"prompt {i}: the messages hold {n_vslots} video slots but {len(video_texts)} clips "
                             "were given")
        # expand each image slot to its merged-token count (as Qwen2VLProcessor does), via a placeholder so
        # already expanded slots are not expanded again
        for n in image_tokens:
            text = text.replace(self.image_token, "<|placeholder|>" * n, 1)
        text = text.replace("<|placeholder|>", self.image_token)
        for vt in video_texts:
            text = text.replace(self.video_token, vt, 1)
        text = text.replace(VIDEO_PLACEHOLDER, self.video_token)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def clip_prompt_length(self, messages: list[dict], num_frames: int, fps: float | None, height: int, width: int,
                           *, close_thinking: bool = False) -> int:
        """Tokens of a one-clip prompt, clip tokens included, as `encode_prompts` would make it, from the clip's
        frame count, rate and frame size alone: no pixel is decoded."""
        s = self.video_settings
        if s is None:
            raise ValueError("Processor: clips need the model type (build the processor with from_pretrained)")
        idx = sample_indices(num_frames, fps, s)
        h, w = resized_hw(len(idx), height, width, s)
        tp = s.temporal_patch_size
        t = -(-len(idx) // tp)
        stamps = patch_timestamps(idx, fps or s.default_source_fps or 24.0, tp)
        grid = torch.tensor([[t, h // s.patch_size, w // s.patch_size]])
        text = self._video_text(ProcessedClips(torch.empty(0), grid, [0.0], [stamps]), 0)
        return len(self._prompt_ids(messages, [], 0, close_thinking, [text]))

    def image_tokens(self, height: int, width: int) -> int:
        """Merged image tokens this processor makes for an image of height x width pixels: the image processor's
        own resize rule and pixel budget, then one token per merge x merge patches."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        f = ip.patch_size * ip.merge_size
        h, w = smart_resize(height, width, factor=f, min_pixels=ip.size.shortest_edge,
                            max_pixels=ip.size.longest_edge)
        return (h // f) * (w // f)

    def prompt_length(self, messages: list[dict], image_sizes: list[tuple[int, int]], *,
                      close_thinking: bool = False) -> int:
        """Tokens of one prompt, image tokens included, as `encode_prompts` would make it before any truncation,
        from the images' (height, width) alone: no pixel is decoded or resized."""
        return len(self._prompt_ids(messages, [self.image_tokens(h, w) for h, w in image_sizes], 0, close_thinking))

    def _truncate(self, ids: list[int], i: int) -> list[int]:
        L = self.max_prompt_length
        if L is None or len(ids) <= L:
            return ids
        cut = ids[:len(ids) - L]
        if any(t in self.vision_token_ids for t in cut):
            raise ValueError(f"prompt {i} has {len(ids)} tokens, over max_prompt_length={L}; truncating it would "
                             "cut image tokens. Raise max_prompt_length, shorten the text or lower max_pixels.")
        return ids[len(ids) - L:]
