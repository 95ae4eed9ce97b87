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
    out = reflect(comps, ["joy"] * len(comps), TAX, images, judge, mode="sample", missing="neutral")
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


# ------------------------------------------------------------------------------ model-backed judge on a tiny QwenVL
# Until emor3.models ships its Processor, a toy processor stands in for it: one token per character, an image is a
# (16, 3*2*14*14) pixel tensor of a 1x4x4-patch grid (4 merged tokens). It follows the PromptBatch contract.

IMG, VSTART, VEND, IM_END, V = 90, 92, 93, 94, 96


def tiny_model(seed=0):
    from emor3.models import QwenVL, QwenVLConfig

    cfg = QwenVLConfig.from_dict(dict(
        model_type="qwen2_vl", image_token_id=IMG, video_token_id=91, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, tie_word_embeddings=True,
        text_config=dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
    ))
    torch.manual_seed(seed)
    return QwenVL(cfg).init_weights(seed, std=0.1).eval()


class ToyTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [4 + (ord(ch) % 80) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (int(i) % 26)) for i in ids if int(i) not in (IM_END,))

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]


class ToyProcessor:
    stop_token_ids = (IM_END,)
    banned_token_ids = (IMG, 91, VSTART, VEND)

    def __init__(self):
        self.tokenizer = ToyTokenizer()
        self.seen = []  # every (input_ids, pixel_values) encoded, to check what the judge received

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode(ids)

    def batch_decode(self, ids, skip_special_tokens=True):
        return [self.decode(r) for r in ids]

    def encode_prompts(self, messages_list, images_list):
        from emor3.models.positions import mrope_position_ids

        rows, pix, grids = [], [], []
        for msgs, imgs in zip(messages_list, images_list):
            ids, it = [1], iter(imgs)
            for c in msgs[0]["content"]:
                if c["type"] == "image":
                    img = next(it)
                    ids += [VSTART] + [IMG] * 4 + [VEND]
                    pix.append(img)
                    grids.append([1, 4, 4])
                else:
                    ids += self.tokenizer.encode(c["text"])
            rows.append(ids + [2, 3])  # end of user turn, assistant header
        P = max(map(len, rows))
        input_ids = torch.zeros(len(rows), P, dtype=torch.long)  # (B, P) left-padded
        mask = torch.zeros(len(rows), P, dtype=torch.long)  # (B, P)
        for i, r in enumerate(rows):
            input_ids[i, P - len(r):] = torch.tensor(r)
            mask[i, P - len(r):] = 1
        grid = torch.tensor(grids, dtype=torch.long) if grids else None
        pos, nxt = mrope_position_ids(input_ids, mask, grid, image_token_id=IMG)
        pixel_values = torch.cat(pix) if pix else None
        self.seen.append((input_ids, pixel_values))
        return SimpleNamespace(input_ids=input_ids, attention_mask=mask, position_ids=pos, next_position=nxt,
                               pixel_values=pixel_values, image_grid_thw=grid)


def image(seed):
    return torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))


def naive_choice_logprob(model, proc, req, choice):
    """Full forward of prompt + choice without a cache: summed log-probs of the choice's tokens."""
    b = proc.encode_prompts([req.messages], [[req.image] if req.image is not None else []])
    c = torch.tensor([proc.tokenizer.encode(choice)])  # (1, L)
    ids = torch.cat([b.input_ids, c], 1)  # (1, P+L)
    pos = torch.cat([b.position_ids, (b.next_position[:, None] + torch.arange(c.shape[1]))[None].expand(3, 1, -1)], 2)
    emb = model.encode_images(b.pixel_values, b.image_grid_thw) if b.pixel_values is not None else None
    with torch.no_grad():
        hidden = model(ids, pos, torch.ones_like(ids), image_embeds=emb)  # (1, P+L, D)
        logp = torch.log_softmax(model.logits(hidden).double(), -1)  # (1, P+L, V)
    P = b.input_ids.shape[1]
    return sum(logp[0, P - 1 + j, c[0, j]].item() for j in range(c.shape[1]))


def test_model_judge_logprob_mode_matches_hand_computed_probabilities():
    from emor3.rewards.reflection import ModelJudge, coherence_request, consistency_request

    model, proc = tiny_model(), ToyProcessor()
    judge = ModelJudge(model, proc)
    reqs = [consistency_request("A girl laughs.", image(0)), consistency_request("A dark alley at night!", image(1))]
    yes_no = ["Yes", "yes", "No", "no"]
    got = judge.choice_logprobs(reqs, [yes_no] * 2)
    for r, lp in zip(reqs, got):
        want = [naive_choice_logprob(model, proc, r, c) for c in yes_no]
        torch.testing.assert_close(lp.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=0,
                                   msg="cached one-prefill choice scoring != naive full forward")
    labels = TAX.labels  # multi-token choices of different lengths: padding must not leak into the sums
    coh = [coherence_request("A girl laughs.", "Happy.", labels), coherence_request("Rain", "Gloomy", labels)]
    got = judge.choice_logprobs(coh, [labels] * 2)
    for r, lp in zip(coh, got):
        want = torch.tensor([naive_choice_logprob(model, proc, r, c) for c in labels], dtype=torch.float64)
        torch.testing.assert_close(lp.double(), want, atol=1e-4, rtol=0, msg="label log-prob sums wrong")
    # end to end: reflect's scores are the hand formula applied to those log-probs
    comp = resp("A girl laughs.", s2="Happy.")
    out = reflect([comp], ["joy"], TAX, [image(0)], judge, mode="logprob")
    p = [math.exp(naive_choice_logprob(model, proc, reqs[0], c)) for c in yes_no]
    assert out.consistency.item() == pytest.approx((p[0] + p[1]) / sum(p), abs=1e-4)
    e = [math.exp(naive_choice_logprob(model, proc, coh[0], c)) for c in labels]
    assert out.coherence.item() == pytest.approx(e[labels.index("joy")] / sum(e), abs=1e-4)


def test_image_reaches_the_consistency_judge():
    from emor3.rewards.reflection import ModelJudge

    model, proc = tiny_model(), ToyProcessor()
    judge = ModelJudge(model, proc)
    comp = [resp("A girl laughs at a puppy.")]
    a = reflect(comp, ["joy"], TAX, [image(0)], judge, mode="logprob")
    ids_a, pix_a = proc.seen[0]
    b = reflect(comp, ["joy"], TAX, [image(7)], judge, mode="logprob")
    ids_b, pix_b = proc.seen[2]  # [1] is the coherence batch of the first call
    assert pix_a is not None and (ids_a == IMG).sum() == 4, "the consistency prompt must carry the image tokens"
    assert torch.equal(ids_a, ids_b) and not torch.equal(pix_a, pix_b), "only the image may differ"
    assert proc.seen[1][1] is None, "the coherence judge is text only"
    logit = lambda x: math.log(x / (1 - x))  # compare log-odds: a random tiny model's yes/no odds may be extreme
    assert abs(logit(a.consistency.item()) - logit(b.consistency.item())) > 0.05, "changing the image must change the score"
    assert a.coherence.item() == pytest.approx(b.coherence.item(), abs=1e-6), "coherence must not see the image"


def test_model_judge_sample_mode_one_batch_seeded():
    from emor3.rewards.reflection import ModelJudge

    model = tiny_model()
    comps = [resp("A girl laughs."), resp("Rain on a window."), "no steps \\boxed{joy}"]
    outs = []
    for _ in range(2):
        proc = ToyProcessor()
        judge = ModelJudge(model, proc, max_new_tokens=4, seed=3)
        outs.append(reflect(comps, ["joy"] * 3, TAX, [image(0), image(1), image(2)], judge, mode="sample"))
        assert len(proc.seen) == 2 and proc.seen[0][0].shape[0] == 2, "one batch per judge, judged rows only"
    assert outs[0].consistency_replies == outs[1].consistency_replies, "seeded judge must repeat"
    assert all(isinstance(r, str) for r in outs[0].consistency_replies[:2]) and outs[0].consistency_replies[2] is None
    assert outs[0].consistency[2].item() == 0.0 and outs[0].coherence[2].item() == 0.5, "the release's missing rule"
    assert not outs[0].consistency.requires_grad


@pytest.fixture(scope="module")
def real_tiny(tmp_path_factory):
    """The real emor3 Processor and a tiny checkpoint (tokenizer trained offline)."""
    pytest.importorskip("emor3.models.processing")
    from emor3.models.checkpoint import load_pretrained
    from emor3.models.processing import Processor
    from emor3.toy.model import build_tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny_judge")
    corpus = ["Can the following text describe the image? Please answer with yes or no. Yes No yes no. "
              "Which emotion best describes the text above? anger, disgust, fear, joy, sadness, surprise."] * 20
    build_tiny_checkpoint(d, corpus)
    return load_pretrained(d).eval(), Processor.from_pretrained(d)


def test_real_processor_judge_logprobs_and_image(real_tiny):
    from PIL import Image

    from emor3.rewards.reflection import ModelJudge, coherence_request, consistency_request

    model, proc = real_tiny
    judge = ModelJudge(model, proc, max_new_tokens=4)
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 40, 255))
    reqs = [consistency_request("A girl laughs.", red), consistency_request("A girl laughs.", blue)]
    yes_no = ["Yes", "yes", "No", "no"]
    got = judge.choice_logprobs(reqs, [yes_no] * 2)
    for r, lp in zip(reqs, got):
        want = torch.tensor([naive_choice_logprob(model, proc, r, c) for c in yes_no], dtype=torch.float64)
        torch.testing.assert_close(lp.double(), want, atol=1e-4, rtol=0, msg="judge log-probs != naive forward")
    assert not torch.allclose(got[0], got[1], atol=1e-5), "the image must reach the consistency judge"
    coh = coherence_request("A girl laughs.", "Happy.", TAX.labels)
    lp = judge.choice_logprobs([coh], [TAX.labels])[0]
    want = torch.tensor([naive_choice_logprob(model, proc, coh, c) for c in TAX.labels], dtype=torch.float64)
    torch.testing.assert_close(lp.double(), want, atol=1e-4, rtol=0, msg="multi-token label sums wrong")
    out = reflect([resp("A girl laughs.", s2="Happy.")] * 2, ["joy"] * 2, TAX, [red, red], judge, mode="sample")
    assert all(isinstance(r, str) for r in out.consistency_replies + out.coherence_replies)
