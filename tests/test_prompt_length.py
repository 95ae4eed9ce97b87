"""--data.max-prompt-length: a prompt's length is counted exactly (image tokens included) from the image's size, and
overlong samples are bad samples (an error naming them, or skipped and counted), never cropped.

Reference: the length of the prompt `encode_samples` really builds for the same sample and image.
"""

import pytest
from PIL import Image

from emor3.data.dataset import PROMPT_TOO_LONG, BadSampleError, EmotionDataset, LoadReport, Sample
from emor3.data.taxonomy import get_taxonomy
from emor3.engine.prompts import build_set_messages, drop_overlong_prompts, encode_samples
from emor3.models.processing import Processor
from emor3.toy.model import build_tiny_checkpoint

CORPUS = ["Which emotion does this image evoke? amusement, anger, awe, contentment", "step by step"] * 20


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    build_tiny_checkpoint(d, CORPUS, name="tiny", seed=0, image_pixels=224 * 224)
    return Processor.from_pretrained(d, min_pixels=28 * 28, max_pixels=224 * 224)


def dataset(tmp_path, sizes):
    samples = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (w, h), (i * 40 % 255, 90, 30)).save(path)
        samples.append(Sample(id=f"s{i}", image=path, label="awe", taxonomy="mikels8"))
    return EmotionDataset(samples, "mikels8", LoadReport(str(tmp_path / "manifest.jsonl"), "jsonl", "mikels8"),
                          min_pixels=28 * 28, max_pixels=224 * 224)


def test_prompt_length_equals_the_encoded_prompt(processor, tmp_path):
    taxes = {"mikels8": get_taxonomy("mikels8")}
    ds = dataset(tmp_path, [(56, 56), (300, 120), (640, 480), (30, 900)])
    msgs = build_set_messages(taxes["mikels8"])
    for i, s in enumerate(ds.samples):
        img = Image.open(s.image)
        encoded = encode_samples(processor, [s], [ds.image(i)], taxes)
        assert processor.prompt_length(msgs, [(img.height, img.width)]) == encoded.input_ids.shape[1], s.id


def test_overlong_prompts_are_counted_or_named_never_cropped(processor, tmp_path):
    taxes = {"mikels8": get_taxonomy("mikels8")}
    ds = dataset(tmp_path, [(56, 56), (640, 480), (56, 84)])
    lengths = [processor.prompt_length(build_set_messages(taxes["mikels8"]), [(Image.open(s.image).height,
                                                                               Image.open(s.image).width)])
               for s in ds.samples]
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit, "the 640x480 image must give the longest prompt"
    kept = drop_overlong_prompts(ds, processor, taxes, limit, "skip")
    assert [s.id for s in kept.samples] == ["s0", "s2"]
    assert kept.report.skipped[PROMPT_TOO_LONG] == 1 and kept.report.loaded == 2
    assert "s1" in kept.report.summary() and "prompt_too_long" in kept.report.summary()
    with pytest.raises(BadSampleError, match=r"s1.*over --data.max-prompt-length"):
        drop_overlong_prompts(dataset(tmp_path, [(56, 56), (640, 480)]), processor, taxes, limit, "error")
    assert drop_overlong_prompts(ds, processor, taxes, 0, "error") is ds, "0 means no limit"
