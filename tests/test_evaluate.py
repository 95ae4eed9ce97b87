"""Evaluation metrics: Wilson intervals against hand-computed values, the interval of a mean of sets, the cue
recall / hallucinated-cue rates of hand-written step-1 texts, and the table's cells."""

import math

import pytest

from emor3.data import Sample
from emor3.toy.emoscenes import cue_mentions, step3_claims
from emor3.data.taxonomy import get_taxonomy
from emor3.evaluate import cue_scores, format_table, mean_interval, reply_scores, set_row, summary_intervals, \
    summary_scores, wilson_interval
from emor3.rewards import parse_set


def test_wilson_interval_hand_values():
    # k=8, n=10, z=1.96: centre (0.8 + 1.9208/10) / 1.38416 = 0.71668; half 1.96 sqrt(0.016 + 0.0096040) / 1.38416
    # = 0.22656 -> (0.4902, 0.9433), the textbook value
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(49.02, abs=0.01) and hi == pytest.approx(94.33, abs=0.01)
    # k=0: the lower bound is 0 and the upper z^2 / (n + z^2) = 3.8415 / 103.8415 = 3.70 %
    lo, hi = wilson_interval(0, 100)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(100 * 3.8415 / 103.8415, abs=0.01)
    lo, hi = wilson_interval(100, 100)  # symmetric to k=0
    assert hi == pytest.approx(100.0) and lo == pytest.approx(100 - 100 * 3.8415 / 103.8415, abs=0.01)
    # half of n: centred on 50 %; width shrinks as 1/sqrt(n)
    lo, hi = wilson_interval(100, 200)
    assert (lo + hi) / 2 == pytest.approx(50.0) and hi - lo == pytest.approx(2 * 100 * 1.96 * math.sqrt(
        0.25 / 200 + 1.96 ** 2 / (4 * 200 ** 2)) / (1 + 1.96 ** 2 / 200), abs=0.01)
    assert wilson_interval(0, 0) == (0.0, 100.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_mean_interval_of_independent_sets():
    # equal sizes: the Wilson interval of the pooled count (50 + 20 correct of 200)
    sets = [{"accuracy": 50.0, "n": 100}, {"accuracy": 20.0, "n": 100}]
    assert mean_interval(sets) == pytest.approx(wilson_interval(70, 200))
    # unequal sizes: n_eff = 4 / (1/100 + 1/400) = 320, mean 35 %
    sets = [{"accuracy": 50.0, "n": 100}, {"accuracy": 20.0, "n": 400}]
    assert mean_interval(sets) == pytest.approx(wilson_interval(0.35 * 320, 320))
    lo, hi = mean_interval([{"accuracy": 0.0, "n": 200}] * 3)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(wilson_interval(0, 600)[1]) and hi > 0.5
    assert mean_interval([{"accuracy": 50.0}]) is None, "no size, no interval"


def _sample(cues):
    return Sample("s0", None, "amusement", "mikels8", {"cues": cues})


def test_cue_recall_and_hallucination_of_hand_written_texts():
    cues = {"face": "smile", "sky": "sunny", "object": "gift"}
    assert cue_scores("A smiling face, a sunny sky and a gift.", _sample(cues)) == (1.0, 0.0)
    # two true cues named, the object claimed wrong (a spider): recall 2/3, one of three kinds hallucinated
    assert cue_scores("A smiling face under the sun next to a spider.", _sample(cues)) == (pytest.approx(2 / 3),
                                                                                         pytest.approx(1 / 3))
    # true value named and a wrong one claimed for the same kind: both counted, per kind (not per word)
    r, h = cue_scores("A smile and a frown, a stormy sky with lightning, a gift.", _sample(cues))
    assert r == pytest.approx(2 / 3) and h == pytest.approx(2 / 3)
    # negated mentions claim nothing
    assert cue_scores("A smiling face and a gift in the sunshine. There is no spider and it is not stormy.",
                      _sample(cues)) == (1.0, 0.0)
    assert cue_scores("", _sample(cues)) == (0.0, 0.0)
    assert cue_scores("a gift", Sample("s1", None, "joy", "emotion6", {})) is None, "no cues recorded: no score"
    assert cue_mentions("a heart and a flower", cues).hallucination == pytest.approx(1 / 3), \
        "two wrong objects are one hallucinated kind"


def test_set_row_and_table_cells():
    row = set_row("in", correct=8, n=10, formatted=9, recalls=[1.0, 0.5], hallucinated=[0.0, 1 / 3])
    assert row["accuracy"] == 80.0 and row["format_rate"] == 90.0
    assert row["accuracy_ci"] == pytest.approx([49.02, 94.33], abs=0.01)
    assert row["cue_recall"] == pytest.approx(75.0) and row["hallucinated"] == pytest.approx(100 / 6)
    other = set_row("out", correct=0, n=0, formatted=0)
    assert other["cue_recall"] is None and other["hallucinated"] is None
    sets = {"test": row, "ood": set_row("out", correct=25, n=100, formatted=50)}
    r = {"sets": sets, **summary_scores(sets), **summary_intervals(sets)}
    assert r["run A^I_ci"] == pytest.approx(row["accuracy_ci"]), "one set: the average's interval is the set's own"
    assert r["run A_ci"][0] < r["run A"] < r["run A_ci"][1]
    table = format_table({"EMO-R3": r}).splitlines()
    assert table[0] == ("| Model | test^I | ood | run A^I | run A^O | run A | format % | no step 1 % | cue recall % | "
                        "hallucinated cues % | recall face/sky/object % | hallucinated face/sky/object % | "
                        "step 3 correct % | answer agrees with step 3 % |")
    cells = table[2].split(" | ")
    assert cells[1] == "80.00 [49.0, 94.3]" and cells[2].startswith("25.00 [17.5, 34.3]")
    assert cells[-8:] == ["70.00", "–", "75.00", "16.67", "–", "–", "–", "– |"], "no per-kind rates: one dash"


def test_table_without_intervals_or_cues():
    sets = {"emoset": {"domain": "in", "accuracy": 70.0, "format_rate": 100.0, "cue_recall": None},
            "emotion6": {"domain": "out", "accuracy": 50.0, "format_rate": 90.0, "cue_recall": None},
            "webemo": {"domain": "out", "accuracy": 40.0, "format_rate": 80.0, "cue_recall": 25.0}}
    s = summary_scores(sets)
    assert s == {"run A^I": 70.0, "run A^O": 45.0, "run A": pytest.approx(160 / 3)}
    table = format_table({"GRPO": {"sets": sets, **s}})
    assert "| GRPO | 70.00 | 50.00 | 40.00 | 70.00 | 45.00 | 53.33 | 90.00 | – | 25.00 | – |" in table
    assert "emoset^I" in table and "emotion6 |" in table


def test_paired_bootstrap_against_exact_enumeration():
    import itertools

    from emor3.evaluate import paired_bootstrap
    b = [10.0, 30.0, 20.0, 50.0]
    a = [13.0, 29.0, 24.0, 52.0]  # differences 3, -1, 4, 2
    mean, lo, hi = paired_bootstrap(a, b, n_boot=40000, seed=1)
    assert mean == pytest.approx(2.0)
    # the exact bootstrap distribution: all 4^4 resamples are equally likely
    d = [x - y for x, y in zip(a, b)]
    means = sorted(sum(c) / 4 for c in itertools.product(d, repeat=4))
    exact_lo, exact_hi = means[int(0.025 * 256)], means[int(0.975 * 256) - 1]
    assert lo == pytest.approx(exact_lo, abs=0.3) and hi == pytest.approx(exact_hi, abs=0.3)
    assert lo < mean < hi
    # pairing: a constant shift is known exactly however much the pairs themselves vary
    assert paired_bootstrap([x + 1.5 for x in b], b) == pytest.approx((1.5, 1.5, 1.5))
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3), "seeded"
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


SMILE_DUSK_GIFT = {"face": "smile", "sky": "dusk", "object": "gift"}  # contentment: positive, low arousal


def test_negations_that_do_and_do_not_negate():
    cues = {"face": "smile", "sky": "sunny", "object": "gift"}
    m = cue_mentions("I don't see a spider, only a gift.", cues)
    assert m.wrong == () and m.named["object"], "\"don't see a spider\" names no spider (n't after a letter)"
    assert cue_mentions("There isn't a spider here.", cues).wrong == ()
    assert cue_mentions("I don\u2019t see a spider.", cues).wrong == (), "a typographic apostrophe negates too"
    m = cue_mentions("No doubt a smiling face.", cues)
    assert m.named["face"], "\"no doubt\" negates nothing: the face is named"
    assert cue_mentions("Not only a gift but a heart.", cues).named["object"]
    m = cue_mentions("Not a gift but a spider.", cues)
    assert m.wrong == (("object", "spider"),) and not m.named["object"], "\"but\" ends the negation's scope"
    assert cue_mentions("I do not think there is a big hairy spider.", cues).wrong == (("object", "spider"),), \
        "the scope is two words: a negation further back negates nothing"


def test_a_sun_in_a_dusk_scene_claims_no_sunny_sky():
    m = cue_mentions("A smiling face, a red sun going down and a gift.", SMILE_DUSK_GIFT)
    assert m.wrong == () and not m.named["sky"], "dusk draws a sun: \"sun\" is neither wrong nor a name for dusk"
    assert cue_mentions("A smiling face under the sun.", dict(SMILE_DUSK_GIFT, sky="sunny")).named["sky"]
    night = cue_mentions("A smiling face under the sun.", dict(SMILE_DUSK_GIFT, sky="night"))
    assert night.wrong == (("sky", "sunny"),), "a night scene draws no sun: the word claims a sunny sky"
    assert cue_mentions("Bright sunshine and a gift.", SMILE_DUSK_GIFT).wrong == (("sky", "sunny"),)


def test_step3_claims_of_hand_written_texts():
    assert step3_claims("The smile makes it positive; the dusk sky gives low arousal.") == ("positive", "low")
    assert step3_claims("Negative valence and high arousal.") == ("negative", "high")
    assert step3_claims("The arousal is low and the mood pleasant.") == ("positive", "low")
    assert step3_claims("It is not positive but negative, with high-energy arousal.") == ("negative", "high")
    assert step3_claims("Positive or negative, hard to say; high arousal, or low arousal.") == (None, None)
    assert step3_claims("Unpleasant.") == ("negative", None), "\"unpleasant\" is not \"pleasant\""
    assert step3_claims(None) == (None, None)


def _reply(text, cues=SMILE_DUSK_GIFT, label="contentment"):
    return reply_scores(parse_set(text), Sample("s", None, label, "mikels8", {"cues": cues}), get_taxonomy("mikels8"))


def test_reply_scores_of_hand_written_replies():
    good = _reply("<step1>A smiling face, a dusk sky and a gift.</step1><step2>Calm.</step2>"
                  "<step3>Positive valence and low arousal.</step3>\\boxed{contentment}")
    assert good == {"step1": True, "named": {"face": True, "sky": True, "object": True},
                    "wrong": {"face": False, "sky": False, "object": False}, "step3_correct": True,
                    "agreement": True, "correct": None, "badge_agrees": None}
    # step 3 wrong about arousal, and the answer follows the box rather than step 3
    r = _reply("<step1>A smiling face, a stormy sky and a gift.</step1><step2>x</step2>"
               "<step3>Positive valence and high arousal.</step3>\\boxed{contentment}")
    assert r["wrong"] == {"face": False, "sky": True, "object": False} and r["named"]["sky"] is False
    assert r["step3_correct"] is False and r["agreement"] is False, "contentment is low arousal, step 3 said high"
    # a coherent but wrong chain: step 3 wrong, the answer agrees with it
    r = _reply("<step1>x</step1><step2>x</step2><step3>Positive with high arousal.</step3>\\boxed{amusement}")
    assert r["step3_correct"] is False and r["agreement"] is True
    # no step 1: counted as such, with no grounding rates (never 0 % hallucinated)
    r = _reply("\\boxed{contentment}")
    assert r == {"step1": False, "named": None, "wrong": None, "step3_correct": None, "agreement": None,
                 "correct": None, "badge_agrees": None}
    # a box that is not a label of the taxonomy: no agreement to score
    assert _reply("<step3>Positive valence and low arousal.</step3>\\boxed{joy}")["agreement"] is None
    assert reply_scores(parse_set("\\boxed{joy}"), Sample("s", None, "joy", "emotion6", {})) is None


def test_set_row_counts_missing_step1_apart_and_per_kind():
    replies = [_reply("<step1>A smiling face, a dusk sky and a spider.</step1><step3>Positive, low arousal."
                      "</step3>\\boxed{contentment}"),
               _reply("<step1>A frowning face at dusk with a gift.</step1><step3>Negative, low arousal.</step3>"
                      "\\boxed{contentment}"),
               _reply("\\boxed{contentment}"), _reply("no format at all")]
    row = set_row("in", correct=4, n=4, formatted=2, replies=replies)
    assert row["no_step1"] == 50.0 and row["n_step1"] == 2 and row["n_cued"] == 4
    assert row["cue_recall"] == pytest.approx(100 * 2 / 3), "over the 2 answers with a step 1, not over all 4"
    assert row["hallucinated"] == pytest.approx(100 / 3), "one wrong kind of three in each answer with a step 1"
    assert row["cue_recall_by_kind"] == {"face": 50.0, "sky": 100.0, "object": 50.0}
    assert row["hallucinated_by_kind"] == {"face": 50.0, "sky": 0.0, "object": 50.0}
    assert row["step3_correct"] == 50.0 and row["n_step3"] == 2
    assert row["agreement"] == 50.0 and row["n_agreement"] == 2
    cells = format_table({"m": {"sets": {"test": row}, **summary_scores({"test": row})}}).splitlines()[2]
    assert "| 50.00 / 100.00 / 50.00 | 50.00 / 0.00 / 50.00 | 50.00 | 50.00 |" in cells
    lost = set_row("in", correct=0, n=2, formatted=0, replies=[_reply("x"), _reply("y")])
    assert lost["no_step1"] == 100.0 and lost["hallucinated"] is None, "losing the format is not 0 % hallucination"


def test_every_cold_start_trace_is_correct_and_coherent():
    """The reference traces are the ceiling of each reasoning check: step 1 names exactly the true cues, step 3
    states the scene's valence and arousal, the boxed label agrees with it (every combination, several phrasings)."""
    import random

    from emor3.toy.emoscenes import all_cue_combinations, coldstart_trace, rule_label
    rng = random.Random(0)
    for cues in all_cue_combinations():
        for _ in range(4):
            r = _reply(coldstart_trace(cues, "mikels8", rng), cues, rule_label(cues))
            assert r["step1"] and all(r["named"].values()) and not any(r["wrong"].values()), r
            assert r["step3_correct"] and r["agreement"], (cues, r)


def test_accuracy_split_by_whether_the_shortcut_badge_agrees():
    """On the shortcut variant each set also reports accuracy where the badge shows the scene's rule label and where
    it does not: a policy that reads the badge is right on the first and wrong on the second."""
    def badged(badge, answer):
        meta = {"cues": SMILE_DUSK_GIFT, "rule_label": "contentment", "shortcut": badge}
        text = f"<step1>x</step1>\\boxed{{{answer}}}"
        return reply_scores(parse_set(text), Sample("s", None, "contentment", "mikels8", meta),
                            get_taxonomy("mikels8"), correct=answer == "contentment")
    replies = [badged("contentment", "contentment"), badged("contentment", "contentment"),
               badged("fear", "fear"), badged("awe", "contentment")]
    assert [r["badge_agrees"] for r in replies] == [True, True, False, False]
    row = set_row("in", correct=3, n=4, formatted=0, replies=replies)
    assert (row["accuracy_badge_agrees"], row["n_badge_agrees"]) == (100.0, 2)
    assert (row["accuracy_badge_disagrees"], row["n_badge_disagrees"]) == (50.0, 2)
    assert "accuracy_badge_agrees" not in set_row("in", correct=1, n=1, formatted=1, replies=[_reply("x")])
