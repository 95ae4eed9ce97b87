"""Rule rewards of EMO-R3: format and accuracy (docs/method.md, "Rewards"). Both are 0/1 floats per response.

format, paper rule (default): remove whitespace around `<`, `>` and `/` (`re.sub(r"\\s*(<|>|/)\\s*", r"\\1", text)`,
as EasyR1's math reward does), then the whole response must match, with `.` matching newlines,
    <step1>.*</step1>.*<step2>.*</step2>.*<step3>.*</step3>.*\\\\boxed\\{.*\\}.*
That pattern is a chain of literals joined by `.*` and anchored at the start, so it matches exactly when the text
starts with `<step1>` and the remaining literals occur in order without overlap. `_paper_format_ok` checks that with
leftmost `str.find`s in linear time (leftmost is optimal for an ordered chain of literals); `re.fullmatch` of the
pattern backtracks through every combination of tag occurrences and is polynomial of high degree on long responses
with many repeated tags. tests/test_rewards.py checks the two agree on random strings.
The paper's rule accepts empty steps and an empty box (a known way to game it, docs/method.md "Rewards").

format, `strict=True` (ours, for new runs; reported beside the paper's): the paper's rule, and also each of the six
step tags exactly once and in order (so no repeated, nested or reordered steps), every step non-empty, exactly one
`\\boxed{...}`, after `</step3>`, closed, non-empty, and nothing but whitespace after it. Whitespace around
`<`, `>`, `/` is removed first, as in the paper's rule.

accuracy, paper rule (default): the content of the last `\\boxed{...}` (balanced braces, stripped; mathruler's
extraction), lower-cased, equals the label (lower-cased too; the paper's labels are lower case, so this is the
paper's rule there). No box → 0.
accuracy, `normalized=True` (ours): Unicode NFKC first (full-width `＼ｂｏｘｅｄ｛…｝` → `\\boxed{…}`), unwrap
`\\text{…}` / `\\mathrm{…}` / `\\textbf{…}`, strip punctuation and symbols, collapse whitespace, lower-case; then a
taxonomy synonym maps to its label ("happy" counts for a label only if the taxonomy says so). Without a taxonomy
only the text normalisation applies.

The taxonomy is duck-typed: any object with `.labels` (sequence of str) and `.synonyms`, either a dict
label -> synonyms (the layout of `emor3.data.Taxonomy`) or a dict synonym -> label.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from emor3.rewards.set_parse import last_boxed

_WS_AROUND_TAG_CHARS = re.compile(r"\s*(<|>|/)\s*")  # the paper's rule; normalize_tag_whitespace is its linear form
_WS_RUN = re.compile(r"(\s+)")
_TAG_CHARS = ("<", ">", "/")  # a tuple: the empty string is in every str

# The paper's format pattern, kept for reference and for the equivalence test; `format_reward` uses the linear check.
PAPER_FORMAT_PATTERN = re.compile(
    r"<step1>.*</step1>.*<step2>.*</step2>.*<step3>.*</step3>.*\\boxed\{.*\}.*", re.DOTALL
)
_PAPER_LITERALS = ("<step1>", "</step1>", "<step2>", "</step2>", "<step3>", "</step3>", "\\boxed{", "}")
_STEP_TAGS = ("<step1>", "</step1>", "<step2>", "</step2>", "<step3>", "</step3>")
_BOX = "\\boxed{"


def normalize_tag_whitespace(text: str) -> str:
    r"""The paper's pre-processing, `_WS_AROUND_TAG_CHARS.sub(r"\1", text)`: drop whitespace around `<`, `>` and `/`.

    The regex retries its leading `\s*` at every position of a whitespace run that no tag character follows, so a
    long run costs quadratic time. Its result is the same as dropping each maximal whitespace run that touches a tag
    character on either side (a run after one is its match's greedy trailing `\s*`, a run before one its leading
    `\s*`), which one split does in linear time."""
    parts = _WS_RUN.split(text)  # text, whitespace, text, ..., text: odd indices are the whitespace runs
    for i in range(1, len(parts), 2):
        if parts[i - 1][-1:] in _TAG_CHARS or parts[i + 1][:1] in _TAG_CHARS:
            parts[i] = ""
    return "".join(parts)


def _paper_format_ok(norm: str) -> bool:
    """`PAPER_FORMAT_PATTERN.fullmatch(norm) is not None`, in linear time (see module docstring)."""
    if not norm.startswith(_PAPER_LITERALS[0]):
        return False
    pos = len(_PAPER_LITERALS[0])
    for lit in _PAPER_LITERALS[1:]:
        i = norm.find(lit, pos)
        if i < 0:
            return False
        pos = i + len(lit)
    return True


def _strict_format_ok(norm: str) -> bool:
    if not _paper_format_ok(norm):
        return False
    positions = []
    for tag in _STEP_TAGS:
        if norm.count(tag) != 1:  # repeated or missing step tag
            return False
        positions.append(norm.index(tag))
    if positions != sorted(positions):  # steps out of order or nested
        return False
    for k in range(3):
        content = norm[positions[2 * k] + len(_STEP_TAGS[2 * k]) : positions[2 * k + 1]]
        if not content.strip():  # empty step
            return False
    if norm.count(_BOX) != 1:
        return False
    box = norm.index(_BOX)
    if box < positions[-1]:  # box before (or inside) the steps
        return False
    depth, i = 1, box + len(_BOX)
    while i < len(norm) and depth:
        depth += {"{": 1, "}": -1}.get(norm[i], 0)
        i += 1
    if depth:  # unclosed box
        return False
    if not norm[box + len(_BOX) : i - 1].strip():  # empty box
        return False
    return not norm[i:].strip()  # nothing after the box


def format_reward(text: str, *, strict: bool = False) -> float:
    """1.0 if `text` follows the SET format, else 0.0. `strict=False` is the paper's rule (see module docstring)."""
    norm = normalize_tag_whitespace(text)
    return float(_strict_format_ok(norm) if strict else _paper_format_ok(norm))


# ---------------------------------------------------------------------------------------------------------- accuracy

_LATEX_WRAPPERS = re.compile(r"\\(?:text|mathrm|textbf|textit|mbox)\s*\{([^{}]*)\}")


def normalize_answer(s: str) -> str:
    """NFKC, unwrap `\\text{}`-like wrappers, punctuation and symbols → space, collapse whitespace, lower-case."""
    s = unicodedata.normalize("NFKC", s)
    s = _LATEX_WRAPPERS.sub(r"\1", s)
    s = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in s)
    return " ".join(s.lower().split())


def _synonym_map(taxonomy: Any) -> dict[str, str]:
    """normalised synonym -> canonical label, from `taxonomy.synonyms` (either direction of dict accepted)."""
    out: dict[str, str] = {}
    syn = getattr(taxonomy, "synonyms", None) or {}
    for k, v in syn.items():
        if isinstance(v, str):  # synonym -> label
            out[normalize_answer(k)] = v
        else:  # label -> [synonyms]
            for s in v:
                out[normalize_answer(s)] = k
    for label in taxonomy.labels:  # a label is its own synonym; labels win over synonyms
        out[normalize_answer(label)] = label
    return out


def _check_label(label: str, taxonomy: Any) -> None:
    if not isinstance(label, str):
        raise TypeError(f"accuracy_reward: label must be a str, got {type(label).__name__} {label!r}")
    if taxonomy is not None and label not in list(taxonomy.labels):
        name = getattr(taxonomy, "name", "?")
        raise ValueError(f"accuracy_reward: label {label!r} is not in taxonomy {name!r} labels {list(taxonomy.labels)}")


def extract_answer(text: str, *, normalized: bool = False) -> str | None:
    """The boxed answer as the accuracy rule sees it (None when there is no closed box)."""
    if normalized:
        ans = last_boxed(unicodedata.normalize("NFKC", text))
        return None if ans is None else normalize_answer(ans)
    ans = last_boxed(text)
    return None if ans is None else ans.lower()


def accuracy_reward(text: str, label: str, taxonomy: Any = None, *, normalized: bool = False) -> float:
    """1.0 if the last boxed answer is `label`, else 0.0. `normalized=False` is the paper's exact lower-case match.

    taxonomy: optional object with `.labels` / `.synonyms`; when given, `label` must be one of its labels (a wrong
    label is a data bug, not a wrong answer), and with `normalized=True` its synonyms count as their label.
    """
    _check_label(label, taxonomy)
    ans = extract_answer(text, normalized=normalized)
    if ans is None:
        return 0.0
    if not normalized:
        return float(ans == label.lower())
    if taxonomy is not None:
        ans = normalize_answer(_synonym_map(taxonomy).get(ans, ans))
    return float(ans == normalize_answer(label))
