"""SET prompt, parse_set, format and accuracy rewards: an adversarial table checked under both options."""

import random
from types import SimpleNamespace

import pytest

from emor3.rewards import (
    accuracy_reward,
    build_set_messages,
    format_reward,
    load_template,
    parse_set,
    set_prompt,
)
from emor3.rewards.rules import PAPER_FORMAT_PATTERN, _paper_format_ok, normalize_tag_whitespace

TAX = SimpleNamespace(
    name="emotion6",
    labels=["anger", "disgust", "fear", "joy", "sadness", "surprise"],
    synonyms={"happy": "joy", "happiness": "joy", "scared": "fear"},
)

S1 = "<step1>A child laughs while a puppy licks her face.</step1>"
S2 = "<step2>A viewer would feel warm and delighted.</step2>"
S3 = "<step3>Positive, high arousal.</step3>"
STEPS = S1 + S2 + S3
LONG = "<step1>" + "the crowd cheers " * 600 + "</step1>" + S2 + S3 + "\\boxed{joy}"  # ~10k characters

# (id, response, paper format, strict format, exact accuracy, normalized accuracy), label "joy"
CASES = [
    ("good", STEPS + "\\boxed{joy}", 1, 1, 1, 1),
    ("good_newlines", S1 + "\n" + S2 + "\n" + S3 + "\n\n\\boxed{joy}\n", 1, 1, 1, 1),
    ("spaced_tags", "< step1 >a</ step1 >\n<step2 > b < /step2><step3>c</step3> \\boxed{joy}", 1, 1, 1, 1),
    ("leading_ws", "\n  " + STEPS + "\\boxed{joy}", 1, 1, 1, 1),
    ("leading_text", "Sure! " + STEPS + "\\boxed{joy}", 0, 0, 1, 1),
    ("empty_box", STEPS + "\\boxed{}", 1, 0, 0, 0),
    ("blank_box", STEPS + "\\boxed{  }", 1, 0, 0, 0),
    ("empty_steps", "<step1></step1><step2> </step2><step3>\n</step3>\\boxed{joy}", 1, 0, 1, 1),
    ("box_before_steps", "\\boxed{joy}" + STEPS, 0, 0, 1, 1),
    ("box_before_step3", S1 + S2 + "\\boxed{joy}" + S3, 0, 0, 1, 1),
    ("box_inside_step3", S1 + S2 + "<step3>positive \\boxed{joy}</step3>", 0, 0, 1, 1),
    ("text_after_box", STEPS + "\\boxed{joy} Hope this helps!", 1, 0, 1, 1),
    ("text_between_step3_and_box", STEPS + " So the answer is \\boxed{joy}", 1, 1, 1, 1),
    ("two_boxes_last_right", STEPS + "\\boxed{sadness} no wait \\boxed{joy}", 1, 0, 1, 1),
    ("two_boxes_last_wrong", STEPS + "\\boxed{joy}\\boxed{sadness}", 1, 0, 0, 0),
    ("nested_box", STEPS + "\\boxed{\\boxed{joy}}", 1, 0, 1, 1),
    ("nested_step2_in_step1", "<step1>a<step2>b</step2></step1>" + S3 + "\\boxed{joy}", 0, 0, 1, 1),
    ("nested_step1_repeated", "<step1>a<step1>b</step1></step1>" + S2 + S3 + "\\boxed{joy}", 1, 0, 1, 1),
    ("repeated_step3", S1 + S3 + S2 + S3 + "\\boxed{joy}", 1, 0, 1, 1),
    ("steps_out_of_order", S2 + S1 + S3 + "\\boxed{joy}", 0, 0, 1, 1),
    ("unclosed_step1", "<step1>a" + S2 + S3 + "\\boxed{joy}", 0, 0, 1, 1),
    ("unclosed_box", STEPS + "\\boxed{joy", 0, 0, 0, 0),
    ("missing_step3", S1 + S2 + "\\boxed{joy}", 0, 0, 1, 1),
    ("no_steps_no_box", "joy", 0, 0, 0, 0),
    ("empty_response", "", 0, 0, 0, 0),
    ("fullwidth_braces", STEPS + "\\boxed｛joy｝", 0, 0, 0, 1),
    ("fullwidth_all", STEPS + "＼ｂｏｘｅｄ｛ＪＯＹ｝", 0, 0, 0, 1),
    ("fullwidth_angle_tags", "＜step1＞a＜/step1＞" + S2 + S3 + "\\boxed{joy}", 0, 0, 1, 1),
    ("unicode_content", "<step1>😀 café, naïve</step1>" + S2 + S3 + "\\boxed{joy}", 1, 1, 1, 1),
    ("upper_case", STEPS + "\\boxed{JOY}", 1, 1, 1, 1),
    ("padded_answer", STEPS + "\\boxed{ Joy }", 1, 1, 1, 1),
    ("punctuated_answer", STEPS + "\\boxed{Joy.}", 1, 1, 0, 1),
    ("latex_text_answer", STEPS + "\\boxed{\\text{joy}}", 1, 1, 0, 1),
    ("synonym", STEPS + "\\boxed{happy}", 1, 1, 0, 1),
    ("not_a_synonym", STEPS + "\\boxed{cheerful}", 1, 1, 0, 0),
    ("other_labels_synonym", STEPS + "\\boxed{scared}", 1, 1, 0, 0),
    ("two_labels", STEPS + "\\boxed{joy, sadness}", 1, 1, 0, 0),
    ("wrong_label", STEPS + "\\boxed{sadness}", 1, 1, 0, 0),
    ("ten_k_chars", LONG, 1, 1, 1, 1),
]


@pytest.mark.parametrize("cid,text,fmt,fmt_strict,acc,acc_norm", CASES, ids=[c[0] for c in CASES])
def test_adversarial_table(cid, text, fmt, fmt_strict, acc, acc_norm):
    assert format_reward(text) == fmt, f"{cid}: paper format rule disagrees with the hand-derived value"
    assert format_reward(text, strict=True) == fmt_strict, f"{cid}: strict format rule wrong"
    assert accuracy_reward(text, "joy", TAX) == acc, f"{cid}: paper exact-match accuracy wrong"
    assert accuracy_reward(text, "joy", TAX, normalized=True) == acc_norm, f"{cid}: normalized accuracy wrong"
    # the paper's rule is the regex itself: our linear check must agree on every table entry
    paper_regex = PAPER_FORMAT_PATTERN.fullmatch(normalize_tag_whitespace(text)) is not None
    assert paper_regex == bool(fmt), f"{cid}: the table disagrees with the paper's own regex"


def test_a_ten_k_tag_flood_is_judged_without_the_backtracking_regex(monkeypatch):
    # a response that repeats tags thousands of times and never boxes: the paper's regex backtracks here (its .*
    # groups try every split), the linear chain of finds does not; the check must never fall back to the regex
    from emor3.rewards import rules

    class Refuse:
        def fullmatch(self, *a, **kw):
            raise AssertionError("format_reward ran the backtracking regex")

        match = search = fullmatch

    monkeypatch.setattr(rules, "PAPER_FORMAT_PATTERN", Refuse())
    text = "<step1>" + "</step1><step2></step2><step3>" * 400 + "</step3>" + " x" * 3000
    assert len(text) > 10_000
    assert format_reward(text) == 0.0 and format_reward(text, strict=True) == 0.0
    assert format_reward(text + "\\boxed{joy}") == 1.0, "the same flood, boxed, follows the paper's format"


def test_tag_whitespace_normaliser_equals_the_papers_regex():
    from emor3.rewards.rules import _WS_AROUND_TAG_CHARS

    pieces = [" ", "  ", "\n", "\t", "\u3000", "<", ">", "/", "a", "step1", "\\boxed{", "}"]
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 16)))
        assert normalize_tag_whitespace(text) == _WS_AROUND_TAG_CHARS.sub(r"\1", text), repr(text)


def test_tag_whitespace_normaliser_does_not_rescan_long_whitespace(monkeypatch):
    # a whitespace run that touches no tag character makes the paper's regex retry `\s*` at every position
    # (quadratic); the normaliser splits the text once and must never run that regex
    from emor3.rewards import rules

    class Refuse:
        def sub(self, *a, **kw):
            raise AssertionError("normalize_tag_whitespace ran the quadratic regex")

    monkeypatch.setattr(rules, "_WS_AROUND_TAG_CHARS", Refuse())
    text = "<step1>x" + " " * 20_000 + "y</step1>"
    assert normalize_tag_whitespace(text) == text
    assert normalize_tag_whitespace("a " * 3 + "/ b") == "a a a/b"


def test_linear_format_check_equals_paper_regex_on_random_strings():
    pieces = ["<step1>", "</step1>", "<step2>", "</step2>", "<step3>", "</step3>", "\\boxed{", "}", "{", "x", "<", "/"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        if rng.random() < 0.5:  # bias towards near-valid strings
            text = "<step1>" + text
        want = PAPER_FORMAT_PATTERN.fullmatch(text) is not None
        assert _paper_format_ok(text) == want, f"linear check != paper regex on {text!r}"


def test_accuracy_without_taxonomy_and_label_errors():
    assert accuracy_reward(STEPS + "\\boxed{Joy!}", "joy", normalized=True) == 1.0
    assert accuracy_reward(STEPS + "\\boxed{happy}", "joy", normalized=True) == 0.0, "synonyms need a taxonomy"
    with pytest.raises(ValueError, match="not in taxonomy"):
        accuracy_reward(STEPS + "\\boxed{joy}", "amusement", TAX)
    # taxonomy given as label -> [synonyms] works the same
    tax2 = SimpleNamespace(labels=TAX.labels, synonyms={"joy": ["happy", "glad"]})
    assert accuracy_reward(STEPS + "\\boxed{Glad}", "joy", tax2, normalized=True) == 1.0


def test_parse_set():
    p = parse_set("< step1 > scene </step1>\n<step2>feel</ step2><step3> pos </step3> \\boxed{ Joy } tail")
    assert (p.step1, p.step2, p.step3, p.answer) == ("scene", "feel", "pos", "Joy")
    p = parse_set("<step1>a</step1> \\boxed{x} \\boxed{y}")
    assert p.step2 is None and p.step3 is None and p.answer == "y", "answer must be the LAST box"
    p = parse_set("<step1>first</step1><step1>second</step1>\\boxed{joy")
    assert p.step1 == "first" and p.answer is None, "unclosed box must give no answer"
    assert parse_set("").step1 is None


PAPER_INSTRUCTION = """You First think the emotional meaning step by step, and then provide the final answer.

The reasoning process MUST follow the structure below:
<step1>Identify what in the scene could trigger emotion (action, face, environment).</step1>
<step2>Describe how a human would feel about it.</step2>
<step3>Conclude if the emotion is positive or negative, and if it's high or low arousal.</step3>

The final answer MUST BE put in \\boxed{}."""


def test_set_prompt_lists_taxonomy_labels_and_paper_instruction(tmp_path):
    text = set_prompt(TAX)
    assert text.endswith(PAPER_INSTRUCTION), "SET instruction must be the authors' text verbatim, last"
    assert "anger, disgust, fear, joy, sadness, surprise" in text, "labels must follow the taxonomy, in order"
    assert "amusement" not in text, "no hard-coded Mikels labels"
    msgs = build_set_messages(["a", "b"])
    assert msgs[0]["role"] == "user"
    assert [c["type"] for c in msgs[0]["content"]] == ["image", "text"], "image first, then text"
    assert "a, b" in msgs[0]["content"][1]["text"]
    # replaceable template from a file; braces elsewhere need no escaping
    f = tmp_path / "t.txt"
    f.write_text("Pick one of {labels} and box it in \\boxed{}.\n", encoding="utf-8")
    assert set_prompt(["x", "y"], load_template(f)) == "Pick one of x, y and box it in \\boxed{}."
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt"):
        load_template(bad)
    with pytest.raises(ValueError, match="labels"):
        set_prompt(["x"], "no placeholder")


def test_with_the_real_taxonomies():
    data = pytest.importorskip("emor3.data.taxonomy")
    mikels, emo6 = data.get_taxonomy("mikels"), data.get_taxonomy("emotion6")
    box = STEPS + "\\boxed{{{}}}"
    assert accuracy_reward(box.format("Happy"), "joy", emo6, normalized=True) == 1.0
    assert accuracy_reward(box.format("Happy"), "joy", emo6) == 0.0, "paper rule has no synonyms"
    assert accuracy_reward(box.format("Awe-inspiring"), "awe", mikels, normalized=True) == 1.0
    assert accuracy_reward(box.format("happy"), "amusement", mikels, normalized=True) == 0.0, \
        "'happy' maps to a Mikels label only if the taxonomy says so"
    assert ", ".join(mikels.labels) in set_prompt(mikels)
