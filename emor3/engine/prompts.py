"""SET (Structured Emotional Thinking) prompts: dataset samples -> chat messages -> a PromptBatch (docs/method.md,
"SET prompt").

The user turn is: the image, the question that lists the sample's allowed labels, then the SET instruction, which is
verbatim the authors' release (`SET_INSTRUCTION`). The model is expected to answer
`<step1>…</step1><step2>…</step2><step3>…</step3>` and then `\\boxed{label}`.

Choices made here (the paper is silent on them; docs/method.md, "Where the paper is silent"):
1. The question wording (`DEFAULT_QUESTION`) is ours; the paper only says it lists the allowed labels. The labels come
   from the sample's taxonomy in its fixed order, comma-separated, never from a hard-coded list.
2. Question and instruction are joined by a blank line (`QUESTION_JOIN`, "\\n\\n"), as the release's format-prompt
   template does (`{{ content | trim }}`, an empty line, then the instruction).
3. A sample that carries its own question (`Sample.question`: a manifest's `question`, an EasyR1 row's `problem`)
   is sent as that question, stripped, then `QUESTION_JOIN`, then the SET instruction; `{labels}` in it, if any, is
   filled as in a template. Without one, the template (`DEFAULT_TEMPLATE` unless given) is used.
4. A template is any string containing `{labels}`; it is filled by plain substitution, not `str.format`, so the
   `\\boxed{}` of the instruction needs no brace escaping. `load_template(path)` reads one from a file.

`encode_samples` turns dataset samples (each naming its taxonomy) and their images into the SET prompts'
``PromptBatch``; the trainer, Cold-Start SFT and evaluation all build their prompts through it. A clip sample (its
visual a `Clip`) gets a video part and the same question about the video (`DEFAULT_VIDEO_QUESTION`).
`drop_overlong_prompts` finds, when the data is loaded, the samples whose SET prompt would exceed
``--data.max-prompt-length`` (the authors' release filters overlong prompts the same way, at load time): a bad
sample each, never a cropped prompt. The parser of
the reply (`parse_set`) is a reward concern: emor3/rewards/set_parse.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from emor3.data.dataset import PROMPT_TOO_LONG, BadSampleError, BadSampleHandler, EmotionDataset
from emor3.models.clips import Clip
from emor3.models.processing import PromptBatch

SET_INSTRUCTION = (
    "You First think the emotional meaning step by step, and then provide the final answer.\n"
    "\n"
    "The reasoning process MUST follow the structure below:\n"
    "<step1>Identify what in the scene could trigger emotion (action, face, environment).</step1>\n"
    "<step2>Describe how a human would feel about it.</step2>\n"
    "<step3>Conclude if the emotion is positive or negative, and if it's high or low arousal.</step3>\n"
    "\n"
    "The final answer MUST BE put in \\boxed{}."
)

DEFAULT_QUESTION = "Which emotion does this image evoke? Choose one of the following emotions: {labels}."

QUESTION_JOIN = "\n\n"  # between the question and the SET instruction, as the release's template

DEFAULT_TEMPLATE = DEFAULT_QUESTION + QUESTION_JOIN + SET_INSTRUCTION

# a clip's prompt: the same question about the video (the SET instruction already speaks of "the scene")
DEFAULT_VIDEO_QUESTION = "Which emotion does this video evoke? Choose one of the following emotions: {labels}."
DEFAULT_VIDEO_TEMPLATE = DEFAULT_VIDEO_QUESTION + QUESTION_JOIN + SET_INSTRUCTION

LABELS_PLACEHOLDER = "{labels}"


def _label_list(labels: Any) -> list[str]:
    """Labels from a taxonomy-like object (anything with `.labels`) or a sequence of strings."""
    labels = getattr(labels, "labels", labels)
    if isinstance(labels, str):
        raise TypeError(f"labels must be a sequence of label strings or a taxonomy, got the string {labels!r}")
    out = [str(x) for x in labels]
    if not out:
        raise ValueError("SET prompt needs at least one label; the taxonomy has none")
    return out


def set_prompt(labels: Any, template: str | None = None, question: str | None = None) -> str:
    """The text of the SET user turn: `template` with `{labels}` replaced by the labels, comma-separated; or, when
    `question` is given, `question + QUESTION_JOIN + SET_INSTRUCTION` (its `{labels}`, if any, filled the same way).

    labels: a taxonomy (anything with `.labels`) or a sequence of label strings, in the taxonomy's order.
    template: None for the paper's (`DEFAULT_TEMPLATE`), else a string that contains `{labels}`.
    question: a sample's own question (`Sample.question`), or None for the template's.
    """
    if question is not None and question.strip():
        text = question.strip() + QUESTION_JOIN + SET_INSTRUCTION
        return text.replace(LABELS_PLACEHOLDER, ", ".join(_label_list(labels)))
    template = DEFAULT_TEMPLATE if template is None else template
    if LABELS_PLACEHOLDER not in template:
        raise ValueError(
            f"SET template must contain {LABELS_PLACEHOLDER} so that the allowed labels reach the model; got "
            f"{template[:80]!r}..."
        )
    return template.replace(LABELS_PLACEHOLDER, ", ".join(_label_list(labels)))


def build_set_messages(labels: Any, template: str | None = None, question: str | None = None, *,
                       video: bool = False) -> list[dict]:
    """Chat messages for one sample, as `Processor.encode_prompts` takes them: the image (with ``video``, the clip)
    first, then the text. A clip without a template of the caller's asks `DEFAULT_VIDEO_QUESTION`."""
    if video and template is None:
        template = DEFAULT_VIDEO_TEMPLATE
    text = set_prompt(labels, template, question)
    return [{"role": "user", "content": [{"type": "video" if video else "image"}, {"type": "text", "text": text}]}]


def sample_prompt(sample, taxonomies: dict, template: str | None = None) -> str:
    """The SET user-turn text of a dataset sample: its taxonomy's labels and its own question, if it has one (a
    clip sample's asks about the video)."""
    if template is None and getattr(sample, "is_clip", False):
        template = DEFAULT_VIDEO_TEMPLATE
    return set_prompt(taxonomies[sample.taxonomy], template, getattr(sample, "question", None))


def load_template(path: str | Path) -> str:
    """Read a SET template from a text file (UTF-8); it must contain `{labels}`. Trailing newlines are dropped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the SET template ({e})") from e
    text = text.rstrip("\n")
    if LABELS_PLACEHOLDER not in text:
        raise ValueError(f"{path}: the SET template must contain {LABELS_PLACEHOLDER} (where the labels go)")
    return text


def encode_samples(processor, samples: Sequence, images: Sequence, taxonomies: dict, template: str | None = None) -> PromptBatch:
    """SET prompts for ``samples`` (each with ``.taxonomy`` naming an entry of ``taxonomies``) and their images (one
    PIL image or `Clip` per sample, as ``EmotionDataset.image`` returns them; a batch may mix both) as a
    PromptBatch; a sample's own question (``Sample.question``) is honoured."""
    messages = [build_set_messages(taxonomies[s.taxonomy], template, getattr(s, "question", None),
                                   video=isinstance(im, Clip)) for s, im in zip(samples, images)]
    return processor.encode_prompts(messages, [[im] for im in images])


def _image_size(sample) -> tuple[int, int]:
    """(height, width) of a sample's image: a file's header only, or the drawn image of an ImageSource."""
    if isinstance(sample.image, (str, Path)):
        with Image.open(sample.image) as im:
            w, h = im.size
    else:
        w, h = sample.image.open().size
    return h, w


def drop_overlong_prompts(dataset: EmotionDataset, processor, taxonomies: dict, max_prompt_length: int,
                          on_bad_sample: str = "error", template: str | None = None) -> EmotionDataset:
    """``dataset`` without the samples whose SET prompt (chat template, question, instruction and the image's
    tokens at the processor's pixel budget, as ``encode_samples`` makes it) is longer than ``max_prompt_length``
    tokens. Each is a bad sample (``prompt_too_long``): an error naming it, or with ``on_bad_sample="skip"``
    dropped and counted in the dataset's report. The image tokens are counted from the image's size (its file
    header), no pixel is decoded; a clip's from its frame count, rate and frame size (file names and the first
    frame's header; a GIF or video file is decoded). ``max_prompt_length`` 0 keeps everything."""
    if not max_prompt_length:
        return dataset
    handle = BadSampleHandler(on_bad_sample, dataset.report)
    messages = {}  # the SET messages depend on the taxonomy and the sample's own question only
    keep = []
    for i, s in enumerate(dataset.samples):
        if getattr(s, "is_clip", False):  # a clip's tokens follow its frame count, rate and frame size
            probe = s.image.probe() if callable(getattr(s.image, "probe", None)) else None
            if probe is None:  # a GIF or video file: decoded to know
                clip = dataset.image(i)
                probe = (clip.num_frames, clip.fps, *clip.frames.shape[-2:])
            msgs = build_set_messages(taxonomies[s.taxonomy], template, getattr(s, "question", None), video=True)
            n = processor.clip_prompt_length(msgs, *probe)
            if n <= max_prompt_length:
                keep.append(s)
            else:
                handle(BadSampleError(PROMPT_TOO_LONG, f"its prompt has {n} tokens with the clip's {probe[0]} "
                                      f"frames, over --data.max-prompt-length {max_prompt_length}; lower "
                                      "--model.video-max-frames or --model.video-max-pixels, or raise the limit",
                                      file=dataset.report.source, sample_id=s.id))
            continue
        key = (s.taxonomy, getattr(s, "question", None))
        if key not in messages:
            messages[key] = build_set_messages(taxonomies[s.taxonomy], template, key[1])
        h, w = _image_size(s)
        n = processor.prompt_length(messages[key], [(h, w)])
        if n <= max_prompt_length:
            keep.append(s)
            continue
        handle(BadSampleError(PROMPT_TOO_LONG, f"its prompt has {n} tokens ({processor.image_tokens(h, w)} of them for "
                              f"the {w}x{h} image), over --data.max-prompt-length {max_prompt_length}; lower "
                              f"--model.max-pixels or raise the limit", file=dataset.report.source, sample_id=s.id))
    if len(keep) == len(dataset):
        return dataset
    return EmotionDataset(keep, dataset.taxonomy, dataset.report, min_pixels=dataset.min_pixels,
                          max_pixels=dataset.max_pixels, factor=dataset.factor, cache_size=dataset.cache_size,
                          cache_dir=dataset.cache_dir)
