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

Truncation: prompts longer than `max_prompt_length` lose tokens on the left (the system prompt end first), unless
that would cut an image's tokens; then the prompt is rejected with an error naming the sample, never truncated.

Shape legend: B prompts, P prompt length (padded), I images in the batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .positions import mrope_position_ids


@dataclass
class PromptBatch:
    input_ids: Tensor  # (B, P) long, left-padded
    attention_mask: Tensor  # (B, P) long, 0 on padding
    position_ids: Tensor  # (3, B, P) long, M-RoPE ids (0 on padding)
    pixel_values: Tensor | None  # (num_patches, C*t*p*p) float, all images in row-major order
    image_grid_thw: Tensor | None  # (I, 3) long, patch grid per image
    next_position: Tensor  # (B,) long, M-RoPE id (all 3 axes) of the first generated token
    num_images: list[int] = field(default_factory=list)  # images per prompt (B entries)

    def to(self, device) -> "PromptBatch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.position_ids), mv(self.pixel_values),
                           mv(self.image_grid_thw), mv(self.next_position), list(self.num_images))

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class Processor:
    """Tokenizer + Qwen2-VL PIL image processor (also Qwen3-VL's). `min_pixels` / `max_pixels` override the image
    pixel budget."""

    def __init__(self, tokenizer, image_processor, *, max_prompt_length: int | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_prompt_length = max_prompt_length
        ids = tokenizer.convert_tokens_to_ids
        self.image_token = "<|image_pad|>"
        self.image_token_id = ids(self.image_token)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids("<|endoftext|>")
        self.stop_token_ids = tuple(ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
        self.banned_token_ids = tuple(ids(t) for t in VISION_SPECIALS)
        self.vision_token_ids = frozenset(self.banned_token_ids)
        self.merge_size = image_processor.merge_size
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                              add_generation_prompt=True) if tokenizer.chat_template else ""
        self.thinking = probe.rstrip().endswith(THINK_OPEN)  # a Thinking model's template opens the block

    @classmethod
    def from_pretrained(cls, path: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None,
                        max_prompt_length: int | None = None) -> "Processor":
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
        return cls(tok, improc, max_prompt_length=max_prompt_length)

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
                       close_thinking: bool = False) -> PromptBatch:
        """Chat messages (one list per prompt) and their PIL images (one list per prompt) -> PromptBatch.

        `close_thinking`: for a Thinking model, end each prompt with an empty reasoning block (no effect
        otherwise)."""
        B = len(messages_list)
        images_list = images_list if images_list is not None else [[] for _ in range(B)]
        if len(images_list) != B:
            raise ValueError(f"{B} prompts but {len(images_list)} image lists")
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
        rows, k = [], 0
        for i, msgs in enumerate(messages_list):
            ids = self._prompt_ids(msgs, n_tokens[k:k + counts[i]], i, close_thinking)
            k += counts[i]
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
        position_ids, next_position = mrope_position_ids(input_ids, attention_mask, grid,
                                                         image_token_id=self.image_token_id,
                                                         spatial_merge_size=self.merge_size)
        return PromptBatch(input_ids, attention_mask, position_ids, pixel_values, grid, next_position, counts)

    def _prompt_ids(self, msgs: list[dict], image_tokens: list[int], i: int, close_thinking: bool) -> list[int]:
        """Token ids of prompt i: the chat template, each image slot expanded to its merged-token count."""
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if close_thinking and self.thinking:
            text += "\n" + THINK_CLOSE + "\n\n"
        n_slots = text.count(self.image_token)
        if n_slots != len(image_tokens):
            raise ValueError(f"prompt {i}: the messages hold {n_slots} image slots but {len(image_tokens)} images "
                             "were given")
        # expand each image slot to its merged-token count (as Qwen2VLProcessor does), via a placeholder so
        # already expanded slots are not expanded again
        for n in image_tokens:
            text = text.replace(self.image_token, "<|placeholder|>" * n, 1)
        text = text.replace("<|placeholder|>", self.image_token)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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
