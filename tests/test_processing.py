"""emor3.models.processing and emor3.toy.model: prompts, images and the tiny checkpoint builder (offline).

The reference is transformers' own Qwen2VLProcessor (without a video processor, which needs torchvision) and
`get_rope_index` (tests/hf_reference.py); the tiny checkpoint must load in both our loader and transformers with
equal logits.
"""

import pytest
import torch
import transformers
from PIL import Image
from hf_reference import image_only_processor, internals

from emor3.models import QwenVL, load_pretrained
from emor3.models.processing import Processor
from emor3.models.sizes import QWEN_SPECIAL_TOKENS, tiny_config
from emor3.toy.model import build_tiny_checkpoint

CORPUS = ["The person looks happy and excited at the party.", "A sad, gloomy rainy day; the man is crying.",
          "Step 1: look at the face. Step 2: the scene. \\boxed{joy}"] * 30


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = build_tiny_checkpoint(d, CORPUS, name="tiny", seed=0)
    return d, model


def messages():
    img_q = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How does she feel?"}]}]
    text_q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                     "text": "Just text"}]}]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "versus"}, {"type": "image"}]}]
    imgs = [[Image.new("RGB", (112, 112), (200, 30, 30))], [],
            [Image.new("RGB", (150, 90), (10, 90, 200)), Image.new("L", (112, 112), 128)]]
    return [img_q, text_q, two], imgs


def test_tokenizer_and_config_agree(ckpt):
    d, model = ckpt
    tok = transformers.AutoTokenizer.from_pretrained(d)
    ids = tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(ids))), "special tokens must be contiguous, in Qwen's order"
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.text.vocab_size == len(tok)
    text = "Step 1: joy \\boxed{joy}"
    assert tok.decode(tok(text)["input_ids"]) == text, "byte-level BPE must round-trip text"
    chat = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")


def test_encode_prompts_matches_transformers_processor(ckpt):
    d, _ = ckpt
    proc = Processor.from_pretrained(d)
    msgs, imgs = messages()
    batch = proc.encode_prompts(msgs, imgs)
    flat = [im for row in imgs for im in row]
    texts = [proc.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    with internals("Qwen2VLProcessor without a video processor"):
        from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

        ref_proc = image_only_processor(Qwen2VLProcessor, proc.image_processor, proc.tokenizer)
        ref = ref_proc(text=texts, images=flat, return_tensors="pt", padding=True, padding_side="left")
    assert torch.equal(batch.input_ids, ref["input_ids"]), "prompt ids differ from Qwen2VLProcessor"
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    assert torch.equal(batch.pixel_values, ref["pixel_values"]) and torch.equal(batch.image_grid_thw,
                                                                                  ref["image_grid_thw"])
    assert batch.num_images == [1, 0, 2]
    assert batch.image_grid_thw.tolist() == [[1, 8, 8], [1, 6, 10], [1, 8, 8]], "112x112 -> 16 merged tokens"
    # positions equal transformers' get_rope_index on the same batch
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d)
    with internals("get_rope_index's arguments"):
        pos, deltas = hf.model.get_rope_index(batch.input_ids, ref["mm_token_type_ids"], batch.image_grid_thw,
                                              attention_mask=batch.attention_mask)
    am = batch.attention_mask
    assert torch.equal(batch.position_ids * am, pos * am)
    assert torch.equal(batch.next_position, am.sum(1) + deltas.squeeze(1))
    # stop / banned ids
    assert proc.stop_token_ids == tuple(proc.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert proc.image_token_id in proc.banned_token_ids
    assert proc.decode(batch.input_ids[1][am[1].bool()]).startswith("system\nBe brief.")


def test_a_shared_image_is_preprocessed_once_with_the_same_batch(ckpt, monkeypatch):
    """The G judge prompts of a group pass the same image object: it is preprocessed once, and the batch equals
    the one built from separate copies of the image (transformers' processor on the copies is the reference)."""
    d, _ = ckpt
    proc = Processor.from_pretrained(d)
    shared, other = Image.new("RGB", (150, 90), (10, 90, 200)), Image.new("L", (112, 112), 128)
    msgs, _ = messages()
    rows = [msgs[0], msgs[2], msgs[0], msgs[1]]
    batch_copies = proc.encode_prompts(rows, [[shared.copy()], [shared.copy(), other.copy()], [shared.copy()], []])
    seen = []
    real = proc.image_processor.__class__.__call__
    monkeypatch.setattr(proc.image_processor.__class__, "__call__",
                        lambda self, images, **kw: seen.append(len(images)) or real(self, images=images, **kw))
    batch = proc.encode_prompts(rows, [[shared], [shared, other], [shared], []])
    assert seen == [2], f"the shared image must be preprocessed once: {seen}"
    for name in ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "next_position"):
        assert torch.equal(getattr(batch, name), getattr(batch_copies, name)), name
    assert batch.num_images == [1, 2, 1, 0]


def test_tiny_checkpoint_same_logits_as_transformers_on_processed_batch(ckpt):
    d, _ = ckpt
    proc = Processor.from_pretrained(d)
    batch = proc.encode_prompts(*messages())
    ours = load_pretrained(d).eval()
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        a = ours.logits(ours(batch.input_ids, batch.position_ids, batch.attention_mask,
                             image_embeds=ours.encode_images(batch.pixel_values, batch.image_grid_thw)))
        b = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
               pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw).logits
    am = batch.attention_mask.bool()
    assert (a - b)[am].abs().max() < 1e-4 * b[am].abs().max().clamp(min=1)


def test_pixel_budget_truncation_and_errors(ckpt):
    d, _ = ckpt
    msgs, imgs = messages()
    small = Processor.from_pretrained(d, min_pixels=28 * 28, max_pixels=56 * 56)
    assert small.encode_prompts(msgs[:1], imgs[:1]).image_grid_thw.tolist() == [[1, 4, 4]], "max_pixels ignored"
    # text-only prompt over the limit: left-truncated
    p = Processor.from_pretrained(d, max_prompt_length=12)
    b = p.encode_prompts([msgs[1]], [[]])
    assert b.input_ids.shape == (1, 12)
    # an image prompt whose truncation would cut image tokens: rejected, never truncated
    with pytest.raises(ValueError, match="prompt 0 .*cut image tokens"):
        p.encode_prompts(msgs[:1], imgs[:1])
    with pytest.raises(ValueError, match="prompt 0: the messages hold 1 image slots but 0 images"):
        p.encode_prompts(msgs[:1], [[]])


def test_named_sizes():
    t = tiny_config("tiny")
    assert (t.text.hidden_size, t.text.num_hidden_layers, t.vision.fullatt_block_indexes) == (128, 4, (1,))
    with torch.device("meta"):
        n100 = sum(p.numel() for p in QwenVL(tiny_config("100m")).parameters())
        n3b = sum(p.numel() for p in QwenVL(tiny_config("qwen2.5-vl-3b")).parameters())
    assert 90e6 < n100 < 110e6
    assert abs(n3b - 3.755e9) < 0.01e9, "Qwen2.5-VL-3B has 3.75B parameters"
    with pytest.raises(ValueError, match="unknown model size"):
        tiny_config("13b")
