"""The parser of SET replies: `<step1>…</step1><step2>…</step2><step3>…</step3>` then `\\boxed{label}`
(docs/method.md, "SET prompt"; the prompt itself is built by emor3/engine/prompts.py).

`parse_set(text)` extracts the three steps (first occurrence of each, tags tolerant of whitespace as the paper's
format rule is: `< step1 >` and `</ step1>` count) and the content of the *last* `\\boxed{...}` with balanced braces,
stripped, as mathruler's `extract_boxed_content` (used by EasyR1) does. Anything missing is None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


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
