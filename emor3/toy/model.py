"""The tiny model of the default run, written offline as a Hugging Face checkpoint folder.

`build_tiny_tokenizer` trains a byte-level BPE (Hugging Face `tokenizers`) on the given texts, appends Qwen's
special tokens in Qwen's order (Qwen3-VL: and its added tokens through </think>) and sets Qwen2-VL's chat template
(Qwen3-VL: a Qwen3-VL-style one), saved so `AutoTokenizer` loads it. `build_tiny_checkpoint` writes config.json +
model.safetensors + tokenizer + preprocessor_config.json that both `load_pretrained` / `Processor.from_pretrained`
and transformers load; the sizes are `emor3.models.sizes`' named ones. `tokenizer_corpus` is what the default
run's tokenizer is trained on: the EmoScenes corpus and every prompt the run sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from emor3.engine.prompts import set_prompt
from emor3.models.checkpoint import build_model, save_pretrained
from emor3.models.sizes import NAMED, NAMED_QWEN3, QWEN3_EXTRA_TOKENS, QWEN_SPECIAL_TOKENS, tiny_config
from emor3.rewards.reflection import COHERENCE_INSTRUCTION, COHERENCE_QUESTION, CONSISTENCY_QUESTION
from emor3.toy.emoscenes import CUE_QUESTIONS, DESCRIBE_QUESTION, corpus_texts

# Qwen2-VL-Instruct's chat template (tokenizer_config.json / chat_template.json of the released models)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A Qwen3-VL-style chat template for the tiny tokenizer (the real checkpoints ship their own, which
# `Processor.from_pretrained` uses): no default system prompt; content lists render images as
# <|vision_start|><|image_pad|><|vision_end|>; the Thinking variant's generation prompt opens a reasoning block.
def qwen3_vl_chat_template(thinking: bool = False) -> str:
    gen = "<|im_start|>assistant\\n" + ("<think>\\n" if thinking else "")
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
        "{%- for content in message['content'] -%}"
        "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
        "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
        "{%- elif content['type'] == 'video' or 'video' in content -%}"
        "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
        "{%- elif 'text' in content -%}{{- content['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + gen + "' -}}{%- endif -%}"
    )


# CLIP normalisation used by the Qwen2-VL image processor
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tiny_tokenizer(corpus_texts: Iterable[str], vocab_size: int, out_dir: str | Path, *,
                         chat_template: str = QWEN2_VL_CHAT_TEMPLATE, extra_tokens: tuple[str, ...] = ()):
    """Train a byte-level BPE of exactly `vocab_size` ids (specials last, in Qwen's order) and save it.

    `extra_tokens` follow the specials as ordinary added tokens (Qwen3's <think> / </think> are not special, so
    decoding keeps them). Returns the transformers tokenizer (PreTrainedTokenizerFast), loadable later with
    AutoTokenizer(out_dir)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # loaded when used
    from transformers import PreTrainedTokenizerFast

    n_special = len(QWEN_SPECIAL_TOKENS) + len(extra_tokens)
    if vocab_size < 256 + n_special + 1:
        raise ValueError(f"vocab_size {vocab_size} must exceed 256 bytes + {n_special} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_special, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus_texts), trainer)
    base = tok.get_vocab_size()
    if base < vocab_size - n_special:
        # a small corpus yields fewer merges than asked: keep ids dense and put the specials right after
        vocab_size = base + n_special
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, chat_template=chat_template,
                                   model_max_length=32768, padding_side="left", clean_up_tokenization_spaces=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def write_preprocessor_config(out_dir: str | Path, *, min_pixels: int, max_pixels: int, patch_size: int = 14,
                              merge_size: int = 2, temporal_patch_size: int = 2, image_mean=IMAGE_MEAN,
                              image_std=IMAGE_STD) -> None:
    cfg = {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "image_mean": list(image_mean),
           "image_std": list(image_std), "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": patch_size,
           "temporal_patch_size": temporal_patch_size, "merge_size": merge_size}
    Path(out_dir, "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def build_tiny_checkpoint(out_dir: str | Path, corpus_texts: Iterable[str], name: str = "tiny", seed: int = 0,
                          vocab_size: int | None = None, image_pixels: int = 112 * 112, thinking: bool = False,
                          **overrides):
    """Write a random-init checkpoint folder (config, weights, tokenizer, preprocessor config); return the model.

    The vocabulary is trained on `corpus_texts`; images are resized by the processor to about `image_pixels`.
    A Qwen3-VL size (`NAMED_QWEN3`) gets Qwen3-VL's extra tokens, a Qwen3-VL-style chat template (`thinking` or a
    name ending in "-thinking": the Thinking variant's) and Qwen3-VL's image normalisation (mean = std = 0.5)
    with 16-px patches."""
    out_dir = Path(out_dir)
    qwen3 = name in NAMED_QWEN3
    thinking = thinking or name.endswith("-thinking")
    if thinking and not qwen3:
        raise ValueError(f"thinking=True needs a Qwen3-VL size ({sorted(NAMED_QWEN3)}), not {name!r}")
    want = vocab_size or (NAMED_QWEN3 if qwen3 else NAMED)[name]["vocab_size"]
    tok = build_tiny_tokenizer(corpus_texts, want, out_dir,
                               **(dict(chat_template=qwen3_vl_chat_template(thinking), extra_tokens=QWEN3_EXTRA_TOKENS)
                                  if qwen3 else {}))
    base = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = tiny_config(name, vocab_size=len(tok), special_token_base=base, **overrides)
    torch.manual_seed(seed)
    model = build_model(cfg).init_weights(seed)
    save_pretrained(model, out_dir)
    m = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    norm = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)) if qwen3 else {}
    write_preprocessor_config(out_dir, min_pixels=min(image_pixels, 4 * m * m), max_pixels=image_pixels,
                              patch_size=cfg.vision.patch_size, merge_size=cfg.vision.spatial_merge_size, **norm)
    return model


def tokenizer_corpus(taxonomies, questions=()) -> list[str]:
    """Texts the tiny tokenizer is trained on: EmoScenes traces and cue words, every prompt the run will send
    (``questions``: the samples' own questions, ``Sample.question``, where they have one)."""
    texts = corpus_texts() + [CONSISTENCY_QUESTION, COHERENCE_QUESTION, DESCRIBE_QUESTION]
    texts += [q for q, _ in CUE_QUESTIONS.values()]
    for tax in taxonomies:
        texts.append(set_prompt(tax))
        texts.append(COHERENCE_INSTRUCTION.replace("{labels}", ", ".join(tax.labels)))
    texts += sorted({q for q in questions if q})
    return texts
