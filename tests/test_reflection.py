"""RER (reflection) scoring with a scripted fake judge, and the model-backed judge on a tiny model."""

import math
from types import SimpleNamespace

import pytest
import torch

from emor3.rewards.reflection import (
    COHERENCE_QUESTION,
    CONSISTENCY_QUESTION,
    JudgeRequest,
    coherence_from_logprobs,
    consistency_from_logprobs,
    reflect,
    score_coherence_reply,
    score_consistency_reply,
)

TAX = SimpleNamespace(name="emotion6", labels=["anger", "disgust", "fear", "joy", "sadness", "surprise"], synonyms={})


def resp(s1, s2="They would feel happy.", s3="Positive, high arousal.", box="joy"):
    return f"<step1>{s1}</step1><step2>{s2}</step2><step3>{s3}</step3>\\boxed{{{box}}}"


class FakeJudge:
    """Scripted judge: the reply (or log-probs) is looked up by a key found in the prompt text."""

    def __init__(self, replies=None, logprobs=None):
        self.replies, self.logprobs = replies or {}, logprobs or {}
        self.calls = []  # (method, requests, choices)

    @staticmethod
    def text(req: JudgeRequest) -> str:
        return "".join(c.get("text", "") for m in req.messages for c in m["content"])

    def _lookup(self, table, req):
        hits = [v for k, v in table.items() if k in self.text(req)]
        assert len(hits) == 1, f"fake judge: no unique script entry for {self.text(req)!r}"
        return hits[0]

    def generate(self, requests):
        self.calls.append(("generate", list(requests), None))
        return [self._lookup(self.replies, r) for r in requests]

    def choice_logprobs(self, requests, choices):
        self.calls.append(("choice_logprobs", list(requests), [list(c) for c in choices]))
        return [torch.tensor(self._lookup(self.logprobs, r), dtype=torch.float32) for r in requests]


@pytest.mark.parametrize("reply,want", [
    ("Yes.", 1.0), ("yes, it can", 1.0), ("YES", 1.0), ("no", 0.0), ("No.", 0.0), ("NO!", 0.0),
    ("None", 0.5), ("I don't know", 0.5), ("", 0.5), ("Nope", 0.5), ("Not really", 0.5), ("Yes and no", 1.0),
])
def test_consistency_reply_rule_is_word_level(reply, want):
    assert score_consistency_reply(reply) == want, f"{reply!r}: substring matching bug ('none'/'know' are not 'no')"


@pytest.mark.parametrize("reply,want", [
    ("joy", 1.0), ("Joy.", 1.0), ("**JOY**", 1.0), (" joy!\n", 1.0), ("None", 0.5), ("none.", 0.5), ("", 0.5),
    ("I don't know", 0.0), ("sadness", 0.0), ("joy, sadness", 0.0), ("joyful", 0.0), ("enjoyment", 0.0),
])
def test_coherence_reply_rule(reply, want):
    assert score_coherence_reply(reply, "joy") == want, f"{reply!r}: coherence rule wrong"


def test_reflect_sample_mode_prompts_scores_and_batching():
    comps = [
        resp("A girl laughs at a puppy."),      # cons "Yes." -> 1, coh "Joy." -> 1
        resp("A dark alley at night."),         # cons "no" -> 0, coh "None" -> 0.5
        resp("A crowd at a stadium."),          # cons "None" -> 0.5, coh "I don't know" -> 0
        resp("An empty room."),                 # cons "I don't know" -> 0.5, coh "fear." -> 0
        "<step1></step1><step2>x</step2><step3>y</step3>\\boxed{joy}",  # empty step 1: neither judge asked
        "<step1>Only step one.</step1>\\boxed{joy}",                    # no step 2: coherence not asked
    ]
    replies = {
        "girl laughs": "Yes.", "dark alley": "no", "crowd at": "None", "empty room": "I don't know",
        "Only step one": "yes",
    }
    coh_replies = {"girl laughs": "Joy.", "dark alley": "None", "crowd at": "I don't know", "empty room": "fear."}

    class TwoScripts(FakeJudge):
        def generate(self, requests):
            is_coh = [COHERENCE_QUESTION in self.text(r) for r in requests]
            assert all(is_coh) or not any(is_coh), "consistency and coherence prompts must be separate batches"
            self.calls.append(("generate", list(requests), None))
            table = coh_replies if is_coh[0] else replies
            return [self._lookup(table, r) for r in requests]

    judge = TwoScripts()
    images = [f"img{i}" for i in range(len(comps))]
    out = reflect(comps, ["joy"] * len(comps), TAX, images, judge, mode="sample")
    assert out.consistency.tolist() == [1.0, 0.0, 0.5, 0.5, 0.5, 1.0]
    assert out.coherence.tolist() == [1.0, 0.5, 0.0, 0.0, 0.5, 0.5], "missing steps must get the neutral 0.5"
    assert out.judged_consistency.tolist() == [True] * 4 + [False, True]
    assert out.judged_coherence.tolist() == [True] * 4 + [False, False]
    assert len(judge.calls) == 2, "each judge must run once for the whole batch"
    cons_reqs, coh_reqs = judge.calls[0][1], judge.calls[1][1]
    assert len(cons_reqs) == 5 and len(coh_reqs) == 4
    # consistency: image first, the paper's question, step 1, and the row's own image
    c0 = cons_reqs[0].messages[0]["content"]
    assert [c["type"] for c in c0] == ["image", "text"] and cons_reqs[0].image == "img0"
    assert c0[1]["text"] == CONSISTENCY_QUESTION + "\nA girl laughs at a puppy."
    assert cons_reqs[4].image == "img5", "row 5's consistency judge must see row 5's image"
    # coherence: text only, steps 1-2, the question, and the taxonomy's labels (not Mikels')
    h0 = coh_reqs[0]
    assert h0.image is None and [c["type"] for c in h0.messages[0]["content"]] == ["text"]
    t = FakeJudge.text(h0)
    assert t == ("A girl laughs at a puppy.\nThey would feel happy.\n" + COHERENCE_QUESTION + "\nAnswer the question "
                 "using one emotional category (one word only): anger, disgust, fear, joy, sadness, surprise.")
    assert "Positive, high arousal" not in t, "step 3 must not reach the coherence judge"
    assert out.consistency_replies[0] == "Yes." and out.coherence_replies[4] is None


def test_reflect_logprob_mode_hand_computed():
    comps = [resp("A girl laughs."), resp("A dark alley.")]
    lp_yes_no = {  # Yes, yes, No, no
        "girl laughs": [math.log(0.3), math.log(0.1), math.log(0.2), math.log(0.2)],
        "dark alley": [math.log(0.01), -50.0, math.log(0.5), math.log(0.09)],
    }
    lp_labels = {"girl laughs": [-3.0, -4.0, -2.0, -0.5, -1.0, -6.0], "dark alley": [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0]}

    class Scripts(FakeJudge):
        def choice_logprobs(self, requests, choices):
            table = lp_labels if COHERENCE_QUESTION in self.text(requests[0]) else lp_yes_no
            self.calls.append(("choice_logprobs", list(requests), [list(c) for c in choices]))
            return [torch.tensor(self._lookup(table, r)) for r in requests]

    judge = Scripts()
    out = reflect(comps, ["joy", "fear"], TAX, ["a", "b"], judge, mode="logprob")
    want_c0 = (0.3 + 0.1) / (0.3 + 0.1 + 0.2 + 0.2)
    want_c1 = (0.01 + math.exp(-50)) / (0.01 + math.exp(-50) + 0.5 + 0.09)
    assert out.consistency.tolist() == pytest.approx([want_c0, want_c1], rel=1e-6)
    e = [math.exp(x) for x in lp_labels["girl laughs"]]
    assert out.coherence[0].item() == pytest.approx(e[3] / sum(e), rel=1e-6), "coherence = softmax over labels at joy"
    assert out.coherence[1].item() == pytest.approx(1 / 6, rel=1e-6)
    assert judge.calls[0][2] == [["Yes", "yes", "No", "no"]] * 2
    assert judge.calls[1][2] == [TAX.labels] * 2, "coherence choices must be the sample's taxonomy labels"
    assert all(c[0] == "choice_logprobs" for c in judge.calls), "logprob mode must not generate"


def test_logprob_helpers_and_errors():
    assert consistency_from_logprobs(torch.tensor([0.0, -1e4, -1e4, -1e4])) == pytest.approx(1.0)
    assert coherence_from_logprobs(torch.tensor([-1e3, 0.0]), 1) == pytest.approx(1.0)
    judge = FakeJudge(replies={"x": "yes"})
    with pytest.raises(ValueError, match="mode"):
        reflect([resp("x")], ["joy"], TAX, ["img"], judge, mode="greedy")
    with pytest.raises(ValueError, match="not one of its taxonomy labels"):
        reflect([resp("x")], ["amusement"], TAX, ["img"], judge)
    with pytest.raises(ValueError, match="image"):
        reflect([resp("x")], ["joy"], TAX, [None], judge)
    # per-row taxonomies: each row's coherence prompt lists its own labels
    mikels = SimpleNamespace(labels=["amusement", "awe"], synonyms={})
    j = FakeJudge(replies={"Can the following": "yes", "amusement, awe": "awe", "anger, disgust": "joy"})
    out = reflect([resp("p"), resp("q")], ["awe", "joy"], [mikels, TAX], ["a", "b"], j)
    assert out.coherence.tolist() == [1.0, 1.0]
