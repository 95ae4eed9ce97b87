"""Clip preprocessing (emor3.models.video) against transformers 5.24's Qwen2-VL / Qwen3-VL video processors.

transformers' video processor classes cannot be built here: they need torchvision, which the test environment lacks
(`Qwen2VLVideoProcessor`'s module does not even import without it). So the steps are checked one by one:
  - against transformers' own functions where they run without torchvision: Qwen3-VL's `sample_frames`,
    `patchify` and `get_num_of_video_patches` (called on a stand-in for the processor's settings), Qwen3-VL's video
    `smart_resize`, Qwen2-VL's image `smart_resize` (which its video processor copies);
  - on hand-checked values where not: Qwen2-VL's frame sampling (its formula worked through by hand below), the
    fused rescale + normalise, and the resampling, which is bicubic with antialiasing on uint8 frames (the kernel
    torchvision's CPU resize calls) and is compared with Pillow's bicubic resize (the same filter, within 1 grey
    level) rather than with torchvision;
plus reading clips from a folder, a frame list, GIF and WebP files, and the missing-PyAV message. The calls into
transformers' functions run inside `hf_reference.internals` (they are internals, checked on the releases named there).
"""

import functools
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hf_reference import internals
from PIL import Image

from emor3.models.video import (Clip, VideoSettings, patch_timestamps, patchify, preprocess_clips, read_clip,
                                resize_frames, resized_hw, sample_indices, smart_resize)



@functools.cache
def hf3():
    """transformers' video_processing_qwen3_vl module, executed from its file: importing it through transformers
    raises for the missing torchvision before any of its functions can be called, though the ones used here do not
    touch torchvision. Call inside `internals(...)`."""
    import transformers.models.qwen3_vl

    name = "transformers.models.qwen3_vl._video_processing_for_emor3_tests"
    path = Path(transformers.models.qwen3_vl.__file__).parent / "video_processing_qwen3_vl.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the class decorators look their module up
    spec.loader.exec_module(module)
    return module


def video_metadata(**kw):
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(**kw)
Q2 = VideoSettings.for_model("qwen2_5_vl")
Q3 = VideoSettings.for_model("qwen3_vl")


def hf3_settings(s: VideoSettings) -> SimpleNamespace:
    """The attributes transformers' Qwen3VLVideoProcessor methods read, with our settings' values."""
    return SimpleNamespace(fps=s.fps, min_frames=s.min_frames, max_frames=s.max_frames, patch_size=s.patch_size,
                           merge_size=s.merge_size, temporal_patch_size=s.temporal_patch_size,
                           size={"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels},
                           cap_pixels_per_frame=s.cap_pixels_per_frame, max_video_tokens=s.max_video_tokens)


def random_clip(n: int, h: int, w: int, fps: float | None = 10.0, seed: int = 0) -> Clip:
    g = torch.Generator().manual_seed(seed)
    return Clip((torch.rand(n, 3, h, w, generator=g) * 255).to(torch.uint8), fps, "random")


@pytest.mark.parametrize("frames,src_fps,fps", [(30, 10.0, 2.0), (7, 30.0, 2.0), (300, 25.0, 1.0), (9, 1.0, 3.0),
                                                (2000, 30.0, 2.0), (5, 5.0, 2.0)])
def test_qwen3_sampling_equals_transformers(frames, src_fps, fps):
    s = VideoSettings.for_model("qwen3_vl", fps=fps, max_frames=64)
    with internals("Qwen3VLVideoProcessor.sample_frames"):
        meta = video_metadata(total_num_frames=frames, fps=src_fps)
        ref = hf3().Qwen3VLVideoProcessor.sample_frames(hf3_settings(s), meta, fps=fps).tolist()
    assert sample_indices(frames, src_fps, s) == ref


def test_qwen2_sampling_hand_checked():
    """n = F / src_fps * fps, clamped to [min_frames, even floor of min(max_frames, F)], rounded down to even;
    frames arange(0, F, F / n) truncated."""
    assert sample_indices(30, 10.0, Q2) == [0, 5, 10, 15, 20, 25]  # n = 6
    assert sample_indices(7, 30.0, Q2) == [0, 1, 3, 5]  # n = 0.47 -> min_frames 4: 0, 1.75, 3.5, 5.25
    assert sample_indices(9, 1.0, VideoSettings.for_model("qwen2_vl", fps=1.0)) == list(range(8))  # 9 -> even 8
    assert sample_indices(100, 10.0, VideoSettings.for_model("qwen2_vl", max_frames=5)) == [0, 25, 50, 75]
    assert sample_indices(11, None, VideoSettings.for_model("qwen2_vl", fps=None)) == list(range(11))
    with pytest.raises(ValueError, match="random: sampling at 2.0 fps needs the clip's frame rate"):
        sample_indices(30, None, Q2, source="random")


@pytest.mark.parametrize("hw", [(480, 640), (37, 301), (1080, 1920), (20, 90), (64, 64)])
@pytest.mark.parametrize("frames", [2, 7, 32])
@pytest.mark.parametrize("cap", [False, True])
def test_resize_sizes_equal_transformers(hw, frames, cap):
    h, w = hw
    s3 = VideoSettings.for_model("qwen3_vl", cap_pixels_per_frame=cap, max_pixels=64 * 32 * 32 * 8,
                                 min_pixels=16 * 32 * 32)
    s2 = VideoSettings.for_model("qwen2_5_vl", max_pixels=64 * 28 * 28, min_pixels=16 * 28 * 28)
    with internals("Qwen3-VL's video and Qwen2-VL's image smart_resize"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as image_smart_resize

        patches = hf3().Qwen3VLVideoProcessor.get_num_of_video_patches(hf3_settings(s3), frames, h, w)
        ref3 = hf3().smart_resize(frames, h, w, factor=32, min_pixels=s3.min_pixels, max_pixels=s3.max_pixels)
        # qwen2, uncapped: the image smart_resize per frame
        ref2 = image_smart_resize(h, w, factor=28, min_pixels=s2.min_pixels, max_pixels=s2.max_pixels)
    gh, gw = (x // s3.patch_size for x in resized_hw(frames, h, w, s3))
    assert (frames + frames % 2) // 2 * gh * gw == patches
    if not cap and min(h, w) >= 32:
        assert resized_hw(frames, h, w, s3) == ref3
    assert resized_hw(frames, h, w, s2) == ref2


def test_qwen2_total_budget_hand_checked():
    """With cap_pixels_per_frame each frame gets at most 0.9 x max_video_tokens x 28^2 x 2 / n pixels, floored at
    1.05 x min_pixels: 100 tokens over 8 frames -> 0.9 * 100 * 784 * 2 / 8 = 17640 px, above 1.05 * 3136 = 3292.8."""
    s = VideoSettings.for_model("qwen2_5_vl", cap_pixels_per_frame=True, max_video_tokens=100, min_pixels=3136)
    assert resized_hw(8, 480, 640, s) == smart_resize(480, 640, factor=28, min_pixels=3136, max_pixels=17640)
    assert resized_hw(8, 480, 640, s) == (112, 140)  # 15680 px <= 17640, 4:5 near 3:4
    assert resized_hw(800, 480, 640, s) == smart_resize(480, 640, factor=28, min_pixels=3136, max_pixels=3292)


def test_patchify_equals_transformers_and_pads_odd_clips():
    s = VideoSettings.for_model("qwen3_vl")
    frames = random_clip(5, 64, 96).frames  # odd: padded to 6 frames with the last one
    ours, grid = patchify(frames, s)
    assert grid == (3, 4, 6) and ours.shape == (3 * 4 * 6, 3 * 2 * 16 * 16)
    norm = (frames.float() / 255 - 0.5) / 0.5  # (5, 3, 64, 96) rescale + normalise by hand
    with internals("Qwen3VLVideoProcessor.patchify"):
        ref, t, gh, gw = hf3().Qwen3VLVideoProcessor.patchify(None, norm[None], patch_size=16, merge_size=2,
                                                               temporal_patch_size=2)
    assert (t, gh, gw) == grid
    assert torch.allclose(ours, ref[0], atol=1e-6), "patch order or normalisation differs from transformers"
    # the padded last temporal patch holds frame 4 twice
    last = ours[-gh * gw:].view(gh * gw, 3, 2, 16, 16)
    assert torch.equal(last[:, :, 0], last[:, :, 1])


def test_resize_is_bicubic_antialiased_like_pillow():
    clip = random_clip(2, 70, 101)
    out = resize_frames(clip.frames, 56, 84)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 56, 84)
    pil = Image.fromarray(clip.frames[1].permute(1, 2, 0).numpy()).resize((84, 56), Image.BICUBIC)
    ref = torch.from_numpy(np.array(pil, dtype=np.int32)).permute(2, 0, 1)  # (3, 56, 84)
    assert (out[1].int() - ref).abs().max() <= 1, "resampling is not Pillow-equivalent bicubic with antialiasing"
    assert resize_frames(clip.frames, 70, 101) is clip.frames  # same size: untouched, as torchvision


def test_preprocess_clips_end_to_end():
    """Two clips of different sizes and rates: grids, patch rows, Qwen2.5-VL seconds per temporal patch and
    Qwen3-VL timestamps."""
    a = random_clip(30, 60, 80, fps=10.0)  # 3 s -> 6 frames at 2 fps
    b = random_clip(7, 40, 40, fps=30.0, seed=1)  # 0.23 s -> min 4 frames
    s = VideoSettings.for_model("qwen3_vl", max_pixels=32 * 32 * 64, min_pixels=32 * 32 * 4)
    out = preprocess_clips([a, b], s)
    assert out.frame_indices == [[0, 6, 12, 17, 23, 29], [0, 2, 4, 6]]
    ha, wa = resized_hw(6, 60, 80, s)
    assert out.video_grid_thw.tolist() == [[3, ha // 16, wa // 16], [2, 2, 2]]
    assert out.pixel_values_videos.shape == (int(out.video_grid_thw.prod(-1).sum()), 3 * 2 * 16 * 16)
    assert out.tokens() == [3 * ha * wa // 16 // 16 // 4, 2]
    # sampled fps = 6 / 30 * 10 = 2 -> 1 s per temporal patch; clip b: 4 / 7 * 30 fps
    assert out.second_per_grid_ts[0] == pytest.approx(1.0)
    assert out.second_per_grid_ts[1] == pytest.approx(2 / (4 / 7 * 30))
    assert out.timestamps[0] == pytest.approx([0.3, 1.45, 2.6])  # mean of frames (0, 6), (12, 17), (23, 29) / 10
    assert patch_timestamps([0, 3, 6], 3.0) == pytest.approx([0.5, 2.0])  # odd: the last frame repeated


# ----------------------------------------------------------------------------------------------- reading clips
def write_frames(folder, n, size=(24, 16)):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", size, (10 * i, 0, 0)).save(folder / f"frame_{i}.png")


def test_read_folder_list_gif_webp(tmp_path):
    write_frames(tmp_path / "clip", 12)
    clip = read_clip(tmp_path / "clip", fps=4)
    assert clip.frames.shape == (12, 3, 16, 24) and clip.fps == 4
    # numbers sort as numbers: frame_2 before frame_10
    assert clip.frames[:, 0, 0, 0].tolist() == [10 * i for i in range(12)]
    listed = read_clip([tmp_path / "clip" / f"frame_{i}.png" for i in (3, 1)], fps=1)
    assert listed.frames[:, 0, 0, 0].tolist() == [30, 10]
    frames = [Image.new("RGB", (20, 12), (0, 40 * i, 0)) for i in range(5)]
    for suffix in (".gif", ".webp"):
        path = tmp_path / f"anim{suffix}"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0,
                       **({"lossless": True} if suffix == ".webp" else {}))
        anim = read_clip(path)
        assert anim.frames.shape == (5, 3, 12, 20) and anim.fps == pytest.approx(10.0), suffix
        assert abs(int(anim.frames[3, 1, 5, 5]) - 120) <= 2, suffix


def test_reading_errors_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: the folder holds no frame images"):
        read_clip(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope.gif: clip not found"):
        read_clip(tmp_path / "nope.gif")
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "0.png")
    Image.new("RGB", (8, 9)).save(tmp_path / "mixed" / "1.png")
    with pytest.raises(ValueError, match="mixed: frames differ in size"):
        read_clip(tmp_path / "mixed", fps=1)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        read_clip([tmp_path / "bad.png"])
    (tmp_path / "clip.mp4").write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV absent
    with pytest.raises(ImportError, match=r"clip.mp4: decoding .mp4 files needs PyAV: pip install 'emor3\[video\]'"):
        read_clip(tmp_path / "clip.mp4")


def test_settings_from_a_published_video_preprocessor_config():
    """Qwen3-VL-*-Instruct's video_preprocessor_config.json (the values as published) and a Qwen2-VL one that keeps
    every frame; unsupported settings are named."""
    published = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                 "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                 "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2, "min_frames": 4, "max_frames": 768,
                 "do_sample_frames": True, "do_resize": True, "resample": 3, "rescale_factor": 1 / 255}
    s = VideoSettings.from_dict("qwen3_vl", published)
    assert (s.family, s.min_pixels, s.max_pixels, s.fps, s.patch_size, s.default_source_fps) == \
        ("qwen3", 4096, 25165824, 2.0, 16, 24.0)
    q2 = VideoSettings.from_dict("qwen2_vl", {"min_pixels": 3136, "max_pixels": 12845056, "do_sample_frames": False})
    assert (q2.family, q2.min_pixels, q2.max_pixels, q2.fps, q2.patch_size) == ("qwen2", 3136, 12845056, None, 14)
    with pytest.raises(ValueError, match=r"v.json: unsupported video settings: do_normalize=false; unknown settings "
                                         r"\['fancy'\]"):
        VideoSettings.from_dict("qwen3_vl", {"do_normalize": False, "fancy": 1}, source="v.json")
    with pytest.raises(ValueError, match="video family 'qwen9' is not one of"):
        VideoSettings(family="qwen9")


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("cap", [False, True])
def test_equals_transformers_video_processor_where_torchvision_is_installed(model_type, cap):
    """End to end against transformers' own `Qwen2VLVideoProcessor` / `Qwen3VLVideoProcessor` (sampling at 2 fps,
    resizing with torchvision, padding, patches): skipped where torchvision is missing, as in the CPU test
    environment; run where it is installed (the GPU machine's image has it)."""
    pytest.importorskip("torchvision", reason="transformers' video processors need torchvision")
    s = VideoSettings.for_model(model_type, min_pixels=8 * 32 * 32, max_pixels=(96 if model_type == "qwen3_vl"
                                                                                 else 24) * 32 * 32,
                                cap_pixels_per_frame=cap, max_video_tokens=40 if model_type == "qwen2_5_vl" else 16)
    clips = [random_clip(30, 60, 80, fps=10.0), random_clip(7, 50, 90, fps=30.0, seed=1),
             random_clip(45, 37, 121, fps=15.0, seed=2)]
    with internals("transformers' video processors"):
        from transformers.video_utils import VideoMetadata

        if model_type == "qwen3_vl":
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as cls
        else:
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as cls
        hf = cls(size={"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels}, patch_size=s.patch_size,
                 merge_size=s.merge_size, temporal_patch_size=s.temporal_patch_size, image_mean=list(s.image_mean),
                 image_std=list(s.image_std), fps=s.fps, min_frames=s.min_frames, max_frames=s.max_frames,
                 do_sample_frames=True, cap_pixels_per_frame=cap, max_video_tokens=s.max_video_tokens)
        meta = [VideoMetadata(total_num_frames=c.num_frames, fps=c.fps) for c in clips]
        ref = hf(videos=[c.frames for c in clips], video_metadata=meta, return_metadata=True, return_tensors="pt")
    ours = preprocess_clips(clips, s)
    assert ours.frame_indices == [list(map(int, m.frames_indices)) for m in ref["video_metadata"]]
    assert torch.equal(ours.video_grid_thw, ref["video_grid_thw"])
    diff = (ours.pixel_values_videos - ref["pixel_values_videos"]).abs().max()
    assert diff < 1e-5, f"patches differ from transformers' video processor by {diff:.2e}"
