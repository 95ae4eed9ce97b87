"""SET (Structured Emotional Thinking) prompt and its parser. EMO-R3, PAPER.md "SET prompt".

The user turn is: the image, the question that lists the sample's allowed labels, then the SET instruction, which is
verbatim the authors' release (`SET_INSTRUCTION`). The model is expected to answer
`<step1>…</step1><step2>…</step2><step3>…</step3>` and then `\\boxed{label}`.

Choices made here (PAPER.md is silent on them):
1. The question wording (`DEFAULT_QUESTION`) is ours; the paper only says it lists the allowed labels. The labels come
   from the sample's taxonomy in its fixed order, comma-separated, never from a hard-coded list.
2. Question and instruction are joined by one space, as EasyR1's format-prompt templates do
   (`{{ content | trim }} You FIRST think ...`), which the authors' release is built on.
3. A template is any string containing `{labels}`; it is filled by plain substitution, not `str.format`, so the
   `\\boxed{}` of the instruction needs no brace escaping. `load_template(path)` reads one from a file.

`parse_set(text)` extracts the three steps (first occurrence of each, tags tolerant of whitespace as the paper's
format rule is: `< step1 >` and `</ step1>` count) and the content of the *last* `\\boxed{...}` with balanced braces,
stripped, as mathruler's `extract_boxed_content` (used by EasyR1) does. Anything missing is None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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

DEFAULT_TEMPLATE = DEFAULT_QUESTION + " " + SET_INSTRUCTION

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


def set_prompt(labels: Any, template: str | None = None) -> str:
    """The text of the SET user turn: `template` with `{labels}` replaced by the labels, comma-separated.

    labels: a taxonomy (anything with `.labels`) or a sequence of label strings, in the taxonomy's order.
    template: None for the paper's (`DEFAULT_TEMPLATE`), else a string that contains `{labels}`.
    """
    template = DEFAULT_TEMPLATE if template is None else template
    if LABELS_PLACEHOLDER not in template:
        raise ValueError(
            f"SET template must contain {LABELS_PLACEHOLDER} so that the allowed labels reach the model; got "
            f"{template[:80]!r}..."
        )
    return template.replace(LABELS_PLACEHOLDER, ", ".join(_label_list(labels)))


def build_set_messages(labels: Any, template: str | None = None) -> list[dict]:
    """Chat messages for one sample, as `Processor.encode_prompts` takes them: the image first, then the text."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": set_prompt(labels, template)}]}]


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


@dataclass(frozen=True)
class SetParse:
    """What `parse_set` finds in one response. Each field is the stripped text, or None when absent."""

    step1: str | None
    step2: str | None
    step3: str | None
    answer: str | None  # content of the last \boxed{...}


def _step_pattern(k: int) -> re.Pattern:
    # whitespace allowed inside the tags, as the paper's rule removes whitespace around <, > and /
    return re.compile(rf"<\s*step{k}\s*>(.*?)<\s*/\s*step{k}\s*>", re.DOTALL)


_STEP_PATTERNS = {k: _step_pattern(k) for k in (1, 2, 3)}
_BOX = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces), stripped; None if there is none or it never closes.

    Same rule as mathruler's `extract_boxed_content` (rfind, then brace depth), which EasyR1's rewards use.
    """
    start = text.rfind(_BOX)
    if start < 0:
        return None
    depth = 1
    i = start + len(_BOX)
    begin = i
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None


def parse_set(text: str) -> SetParse:
    """Steps 1-3 (first occurrence of each, stripped) and the last boxed answer of a SET response."""
    steps = []
    for k in (1, 2, 3):
        m = _STEP_PATTERNS[k].search(text)
        steps.append(m.group(1).strip() if m else None)
    return SetParse(steps[0], steps[1], steps[2], last_boxed(text))


def set_prompts(taxonomies_or_labels: Sequence[Any], template: str | None = None) -> list[str]:
    """`set_prompt` for a list of samples (each entry a taxonomy or a label list)."""
    return [set_prompt(x, template) for x in taxonomies_or_labels]
