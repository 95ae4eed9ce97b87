"""Prompts with clips: emor3's Processor against transformers 5.24's Qwen2_5_VLProcessor / Qwen3VLProcessor on tiny
checkpoint folders, and the tiny models' logits against transformers' on the processed batch.

transformers' video processor needs torchvision, which the test environment lacks, so the reference processors get a
stand-in video processor that hands them emor3's preprocessed clips (pixels, grids, and the metadata transformers
keeps: source fps and the frames kept). What is compared is therefore transformers' own prompt side: the
`<|video_pad|>` expansion (Qwen3-VL's `<t seconds>` per temporal patch), `second_per_grid_ts`, the token ids and
mask, and `get_rope_index` on the result; the pixels themselves are pinned by tests/test_video.py.
"""

import json
import shutil

import pytest
import torch
import transformers
from PIL import Image
from hf_reference import internals
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from emor3.models import load_pretrained
from emor3.models.processing import Processor
from emor3.toy.model import build_tiny_checkpoint
from emor3.models.video import Clip, VideoSettings, preprocess_clips, read_clip

CORPUS = ["The person looks happy and excited at the party.", "A sad, gloomy rainy day; the man is crying.",
          "Step 1: look at the face. Step 2: the scene. \\boxed{joy}"] * 30
NAMES = {"qwen2_5_vl": "tiny", "qwen3_vl": "tiny-qwen3-vl"}
HF = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
      "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}


class StandInVideoProcessor:
    """Returns emor3's preprocessing of the clips it is given, with the metadata transformers' processors read."""

    def __init__(self, clips: list[Clip], settings: VideoSettings):
        self.clips, self.settings = clips, settings
        self.temporal_patch_size, self.merge_size = settings.temporal_patch_size, settings.merge_size

    def __call__(self, videos, **kw):
        out = preprocess_clips(self.clips, self.settings)
        meta = [VideoMetadata(total_num_frames=c.num_frames, fps=c.fps, frames_indices=list(idx))
                for c, idx in zip(self.clips, out.frame_indices)]
        return {"pixel_values_videos": out.pixel_values_videos, "video_grid_thw": out.video_grid_thw,
                "video_metadata": meta}


def reference_processor(model_type, proc: Processor, clips):
    """transformers' processor running its own __init__, with the stand-in as its video processor (ProcessorMixin's
    class check told to accept it)."""
    base = Qwen3VLProcessor if model_type == "qwen3_vl" else Qwen2_5_VLProcessor

    class WithStandIn(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, StandInVideoProcessor):
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return WithStandIn(image_processor=proc.image_processor, tokenizer=proc.tokenizer,
                       video_processor=StandInVideoProcessor(clips, proc.video_settings))


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    build_tiny_checkpoint(d, CORPUS, name=NAMES[request.param], seed=0, vocab_size=400)
    return request.param, d


def clips_and_prompts():
    g = torch.Generator().manual_seed(0)
    a = Clip((torch.rand(30, 3, 60, 80, generator=g) * 255).to(torch.uint8), 10.0, "a")  # 3 s at 10 fps
    b = Clip((torch.rand(9, 3, 50, 40, generator=g) * 255).to(torch.uint8), 3.0, "b")  # 3 s at 3 fps
    video_q = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "How does she feel?"}]}]
    both = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "then"}, {"type": "video"}]}]
    text = [{"role": "user", "content": [{"type": "text", "text": "Just text"}]}]
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    return [video_q, both, text], [[], [img], []], [[a], [b], []], [a, b], [img]


def test_clip_prompts_equal_transformers_processor_and_model(ckpt):
    model_type, d = ckpt
    s = VideoSettings.for_model(model_type, max_pixels=64 * 32 * 32, min_pixels=8 * 32 * 32)
    proc = Processor.from_pretrained(d, video_settings=s)
    assert proc.model_type == model_type
    msgs, imgs, vids, flat_v, flat_i = clips_and_prompts()
    batch = proc.encode_prompts(msgs, imgs, videos_list=vids)
    assert batch.num_videos == [1, 1, 0] and batch.num_images == [0, 1, 0]
    texts = [proc.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    with internals("the Qwen-VL processors with a stand-in video processor"):
        ref = reference_processor(model_type, proc, flat_v)(
            text=texts, images=flat_i, videos=[c.frames for c in flat_v], return_tensors="pt", padding=True,
            padding_side="left")
    assert torch.equal(batch.input_ids, ref["input_ids"]), "clip prompt ids differ from transformers' processor"
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    assert torch.equal(batch.video_grid_thw, ref["video_grid_thw"])
    assert torch.equal(batch.pixel_values_videos, ref["pixel_values_videos"])
    if model_type == "qwen2_5_vl":
        assert batch.second_per_grid_ts.tolist() == pytest.approx(ref["second_per_grid_ts"])
        assert batch.second_per_grid_ts.tolist() == pytest.approx([1.0, 1.0])  # 2 fps kept, 2 frames per patch
    else:
        text0 = proc.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
        assert "<0.3 seconds><|vision_start|><|video_pad|>" in text0 and "<2.6 seconds>" in text0, text0[:200]
    hf = HF[model_type].from_pretrained(d, dtype=torch.float32).eval()
    extra = {"second_per_grid_ts": ref["second_per_grid_ts"]} if model_type == "qwen2_5_vl" else {}
    with internals("get_rope_index's arguments"):
        pos, deltas = hf.model.get_rope_index(batch.input_ids, ref["mm_token_type_ids"], batch.image_grid_thw,
                                              batch.video_grid_thw, attention_mask=batch.attention_mask, **extra)
    am = batch.attention_mask
    assert torch.equal(batch.position_ids * am, pos * am), "clip prompt M-RoPE ids differ from get_rope_index"
    assert torch.equal(batch.next_position, am.sum(1) + deltas.squeeze(1))
    ours = load_pretrained(d).eval()
    with torch.no_grad():
        a = ours.logits(ours(batch.input_ids, batch.position_ids, am,
                             image_embeds=ours.encode_images(batch.pixel_values, batch.image_grid_thw),
                             video_embeds=ours.encode_videos(batch.pixel_values_videos, batch.video_grid_thw)))
        b = hf(input_ids=batch.input_ids, attention_mask=am, pixel_values=batch.pixel_values,
               image_grid_thw=batch.image_grid_thw, pixel_values_videos=batch.pixel_values_videos,
               video_grid_thw=batch.video_grid_thw, mm_token_type_ids=ref["mm_token_type_ids"], **extra).logits
    m = am.bool()
    assert (a - b)[m].abs().max() < 1e-4 * b[m].abs().max().clamp(min=1), "logits on processed clips differ"


def test_clip_prompt_errors_and_settings(ckpt, tmp_path):
    model_type, d = ckpt
    proc = Processor.from_pretrained(d, video_settings=VideoSettings.for_model(
        model_type, max_pixels=64 * 32 * 32, min_pixels=8 * 32 * 32))
    msgs, _, vids, _, _ = clips_and_prompts()
    with pytest.raises(ValueError, match="prompt 0: the messages hold 1 video slots but 0 clips"):
        proc.encode_prompts([msgs[0], msgs[2]], videos_list=[[], vids[0]])
    with pytest.raises(ValueError, match="clips need the model type"):
        Processor(proc.tokenizer, proc.image_processor).encode_prompts([msgs[0]], videos_list=[vids[0]])
    # a clip shared by prompts is preprocessed once and laid out as separate copies would be
    shared = vids[0][0]
    copy = Clip(shared.frames.clone(), shared.fps, "copy")
    one = proc.encode_prompts([msgs[0], msgs[0]], videos_list=[[shared], [shared]])
    two = proc.encode_prompts([msgs[0], msgs[0]], videos_list=[[shared], [copy]])
    for name in ("input_ids", "position_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    # a clip given as a path is read with read_clip (a GIF here: 6 frames at 5 fps)
    gif = tmp_path / "c.gif"
    frames = [Image.new("RGB", (40, 30), (40 * i, 90, 0)) for i in range(6)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=200, loop=0)
    by_path = proc.encode_prompts([msgs[0]], videos_list=[[gif]])
    by_clip = proc.encode_prompts([msgs[0]], videos_list=[[read_clip(gif)]])
    assert torch.equal(by_path.input_ids, by_clip.input_ids)
    assert torch.equal(by_path.pixel_values_videos, by_clip.pixel_values_videos)
    # video_preprocessor_config.json beside the checkpoint sets the budgets; patch sizes follow the image processor
    shutil.copytree(d, tmp_path / "c")
    (tmp_path / "c" / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 4096, "longest_edge": 65536}, "fps": 1, "max_frames": 8}))
    read = Processor.from_pretrained(tmp_path / "c").video_settings
    assert (read.min_pixels, read.max_pixels, read.fps, read.max_frames) == (4096, 65536, 1.0, 8)
    assert read.patch_size == proc.image_processor.patch_size
    with pytest.raises(ValueError, match="video settings .* differ from the image processor's"):
        Processor(proc.tokenizer, proc.image_processor, model_type=model_type,
                  video_settings=VideoSettings.for_model(model_type, patch_size=8))
