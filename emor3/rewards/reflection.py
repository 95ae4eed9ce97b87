"""RER, the Reflective Emotional Reward of EMO-R3 (docs/method.md, "Rewards"): the model re-reads its own reasoning.

Two self-judgements per completion, each a new single-turn chat:
  consistency (visual-text): the image, then `Can the following text describe the image? Please answer with yes or
      no.` followed by step 1's text. The image really is passed (the authors' first release forgot it);
      tests/test_reflection.py checks that changing only the image changes the judge's input and its score.
  coherence (emotional): steps 1 and 2 as text only (no image), then `Which emotion best describes the text above?`
      and `Answer the question using one emotional category (one word only): <labels>.`, where <labels> are the
      sample's taxonomy labels comma-separated in the taxonomy's order (the authors hard-coded Mikels' eight).
Prompt text (`JUDGE_PROMPTS`; the paper gives the sentences, not how they are joined):
  "clean" (default): the steps' text without their tags, parts joined by "\\n", in the order above.
  "release": the release's text, byte for byte. Consistency: the image, then "\\n", the question with no space
      between its two sentences and no separator after it, then the span from `<step1>` up to `<step2>` (tags
      kept, stripped; no `<step2>`, no span). Coherence: the span from `<step1>` to `</step2>` (tags kept,
      stripped), "\\n", the question, "\\n", the instruction.

Who judges: the current policy (the paper: same weights as the rollout) or the frozen reference model (option);
the caller passes whichever model to `ModelJudge`. No gradient flows through a judgement (torch.inference_mode).

Scoring modes:
  "sample" (the paper): one reply per judge prompt, sampled at temperature 0.6, top-p 0.95, scored by the paper's
      rules with *word-level* matching (the reply split into lower-case words; the authors' substring test counts
      "none" and "I don't know" as "no"):
        consistency: a word "yes" → 1, else a word "no" → 0, else 0.5
        coherence:   `COHERENCE_MATCHES`: "lenient" (default): the reply's words equal the label's words (so
                     "Joy." and "**joy**" count) → 1, empty or "none" → 0.5, anything else → 0;
                     "exact" (the release's `rethink_reward`): reply.lower() == label.lower() → 1, an empty reply
                     or reply.lower() == "none" → 0.5, anything else (" joy", "Joy.", "None.") → 0
  "logprob" (ours, no generation, lower variance): from the judge's next-token distribution after the prompt,
        consistency = P(yes) / (P(yes) + P(no)), with P(yes) = p("Yes") + p("yes"), P(no) = p("No") + p("no"),
                      each the probability of that string as the start of the reply (for Qwen's tokenizer each is
                      one token, so this is the first answer token's probability; a string of several tokens uses
                      the product of its tokens' probabilities)
        coherence   = softmax over the taxonomy's labels of Σ_tokens log p(label's tokens), read at the
                      ground-truth label (labels written exactly as in the taxonomy).
Unextractable steps (the paper is silent; docs/method.md, "Where the paper is silent"): when step 1 (consistency) or
step 1 or 2 (coherence) cannot be extracted or is empty, that judge is not asked and the component gets the score of
`MISSING_RULES[missing]`:
  "release" (default): consistency 0, coherence 0.5. The release asks the judge to "Answer 'None'" instead; its
      consistency parser tests for the substring "no", which "None" contains (→ 0), and its coherence parser scores
      "None" as undecided (→ 0.5). The judge's obedient reply is scored here without asking it.
  "neutral": both 0.5, the value the paper gives an undecidable judgement, so RER neither rewards nor punishes a
      missing step and the format reward alone penalises it.

Batching: all consistency prompts of a rollout batch go to the judge as one batch, all coherence prompts as another
(`ModelJudge` may split them into `max_batch_size` chunks to bound memory). Within a batch `ModelJudge` shares
prefixes (`share_prefix=True`, the default; `--reward.judge-share-prefix`): the G consistency prompts of a GRPO group
hold the same chat header, image and question and differ only in step 1, so requests about the same image object
are grouped, their longest common token prefix is prefilled once (its image encoded once by the vision tower) and
copied to their cache rows, and only each request's rest (step 1, the end of the user turn, the assistant header)
is prefilled per request (`split_shared_prefixes`, `emor3.engine.sampler.PromptSuffix`). Text-only coherence
prompts share the chat header the same way. Every token keeps its ids and M-RoPE position, so the replies (for a
seed) and log-probs are those of the unshared prompts (tests/test_judge_share.py: same texts, 1e-5 in fp32); the
processor still tokenises each request, and preprocesses an image object shared by requests once. A `Judge` is
anything with
`generate(requests) -> list[str]` and `choice_logprobs(requests, choices) -> list[Tensor]`, so the scoring logic is
tested with a scripted fake judge, and `ModelJudge` runs the emor3 model (emor3.models Processor / QwenVL and
emor3.engine.sampler.sample).

Shapes: N completion rows, R judge requests (≤ N), K choices of one request, P prompt length, L choice length,
V vocabulary, D hidden size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from emor3.config import CoherenceMatch, JudgeMode, JudgePrompt, MissingStep, choices
from emor3.engine.sampler import PromptSuffix, prefill, sample
from emor3.engine.visuals import is_clip, select_visuals, visual_part
from emor3.models.positions import decode_position_ids
from emor3.models.processing import PromptBatch
from emor3.rewards.set_parse import parse_set

CONSISTENCY_QUESTION = "Can the following text describe the image? Please answer with yes or no."
# the release's consistency question: its two sentences are joined without a space
RELEASE_CONSISTENCY_QUESTION = "Can the following text describe the image?Please answer with yes or no."
COHERENCE_QUESTION = "Which emotion best describes the text above?"
COHERENCE_INSTRUCTION = "Answer the question using one emotional category (one word only): {labels}."
# score of (consistency, coherence) where the steps that judge reads are missing; see the module docstring
MISSING_RULES = {"release": (0.0, 0.5), "neutral": (0.5, 0.5)}
assert tuple(MISSING_RULES) == choices(MissingStep), "MissingStep (emor3.config) names every rule"
YES_STRINGS = ("Yes", "yes")
NO_STRINGS = ("No", "no")
MODES = choices(JudgeMode)
# the choices of --reward.judge-prompt and --reward.coherence-match, read from their declaration (auto is resolved
# by the config before it reaches here)
JUDGE_PROMPTS = tuple(x for x in choices(JudgePrompt) if x != "auto")
COHERENCE_MATCHES = tuple(x for x in choices(CoherenceMatch) if x != "auto")
# the release's spans (its trainer's extract_step1_to_step2 and extract_steps): tags kept
_RELEASE_STEP1 = re.compile(r"(<step1>.*?)(?=<step2>)", re.S)
_RELEASE_STEPS12 = re.compile(r"(<step1>.*?</step2>)", re.S)


# -------------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class JudgeRequest:
    """One judge prompt: chat messages (Processor format) and the image they refer to (None for text only)."""

    messages: list
    image: Any = None


def _about(question: str, visual: Any) -> str:
    """The consistency question about a clip asks whether the text describes "the video"."""
    return question.replace("the image", "the video") if is_clip(visual) else question


def consistency_request(step1: str, image: Any) -> JudgeRequest:
    """The visual-text judge: the image first, then the question and step 1."""
    if image is None:
        raise ValueError("the consistency judge needs the sample's image (docs/method.md, \"Rewards\": the image must reach it)")
    text = f"{_about(CONSISTENCY_QUESTION, image)}\n{step1}"
    return JudgeRequest([{"role": "user", "content": [visual_part(image), {"type": "text", "text": text}]}], image)


def coherence_request(step1: str, step2: str, labels: Sequence[str]) -> JudgeRequest:
    """The emotional judge: steps 1-2 as text only, the question, and the taxonomy's labels."""
    instr = COHERENCE_INSTRUCTION.replace("{labels}", ", ".join(labels))
    text = f"{step1}\n{step2}\n{COHERENCE_QUESTION}\n{instr}"
    return JudgeRequest([{"role": "user", "content": [{"type": "text", "text": text}]}], None)


def release_spans(completion: str) -> tuple[str, str]:
    """(consistency span, coherence span) of a completion as the release cuts them, tags kept: `<step1>` up to
    `<step2>`, and `<step1>` through `</step2>`, each stripped; "" where the release finds none."""
    one, both = _RELEASE_STEP1.search(completion), _RELEASE_STEPS12.search(completion)
    return (one.group(1).strip() if one else "", both.group(1).strip() if both else "")


def release_consistency_request(span: str, image: Any) -> JudgeRequest:
    """The release's visual-text judge: the image, "\\n", its question and the step-1 span with no separator."""
    if image is None:
        raise ValueError("the consistency judge needs the sample's image (docs/method.md, \"Rewards\": the image "
                         "must reach it)")
    text = f"\n{_about(RELEASE_CONSISTENCY_QUESTION, image)}{span}"
    return JudgeRequest([{"role": "user", "content": [visual_part(image), {"type": "text", "text": text}]}], image)


def release_coherence_request(span: str, labels: Sequence[str]) -> JudgeRequest:
    """The release's emotional judge: the steps 1-2 span, then the question and the instruction, "\\n" between."""
    instr = COHERENCE_INSTRUCTION.replace("{labels}", ", ".join(labels))
    text = f"{span}\n{COHERENCE_QUESTION}\n{instr}"
    return JudgeRequest([{"role": "user", "content": [{"type": "text", "text": text}]}], None)


# -------------------------------------------------------------------------------------------------------- scoring

_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits, Unicode-aware; "don't" -> "don", "t"


def words(text: str) -> list[str]:
    """Lower-case words of a reply (punctuation and markup dropped)."""
    return _WORD.findall(text.lower())


def score_consistency_reply(reply: str) -> float:
    """The paper's rule with word matching: yes → 1, else no → 0, else 0.5."""
    w = words(reply)
    if "yes" in w:
        return 1.0
    if "no" in w:
        return 0.0
    return 0.5


def score_coherence_reply(reply: str, label: str, match: str = "lenient") -> float:
    """The paper's rule: equal to the label → 1, empty or "none" → 0.5, else 0; "equal" per ``match`` (a key of
    `COHERENCE_MATCHES`): lenient compares words, exact the whole lower-cased reply as the release does."""
    if match == "exact":
        r = reply.lower()
        if not reply or r == "none":
            return 0.5
        return 1.0 if r == label.lower() else 0.0
    if match != "lenient":
        raise ValueError(f"unknown coherence match {match!r}; valid: {COHERENCE_MATCHES}")
    w = words(reply)
    if w == words(label):
        return 1.0
    if not w or w == ["none"]:
        return 0.5
    return 0.0


def consistency_from_logprobs(lp: torch.Tensor) -> float:
    """lp: (4,) log-probs of YES_STRINGS + NO_STRINGS. P(yes) / (P(yes) + P(no)), computed in log space."""
    assert lp.shape == (len(YES_STRINGS) + len(NO_STRINGS),), f"expected yes/no log-probs, got {tuple(lp.shape)}"
    lp = lp.double()
    ly = torch.logsumexp(lp[: len(YES_STRINGS)], 0)
    ln = torch.logsumexp(lp[len(YES_STRINGS) :], 0)
    return float(torch.sigmoid(ly - ln))  # = e^ly / (e^ly + e^ln)


def coherence_from_logprobs(lp: torch.Tensor, label_index: int) -> float:
    """lp: (K,) summed log-probs of each label; the label's share after normalising over the K labels."""
    assert lp.dim() == 1 and 0 <= label_index < lp.shape[0], f"bad label index {label_index} for {tuple(lp.shape)}"
    return float(torch.softmax(lp.double(), 0)[label_index])


# -------------------------------------------------------------------------------------------------------- judges


class Judge(Protocol):
    def generate(self, requests: Sequence[JudgeRequest]) -> list[str]:
        """One sampled reply per request (the paper: temperature 0.6, top-p 0.95)."""

    def choice_logprobs(self, requests: Sequence[JudgeRequest], choices: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """For request r, a (K_r,) tensor: log p(choices[r][k] is how the reply starts), summed over its tokens."""


@dataclass
class ReflectionResult:
    """RER scores of N completions, and what the judge saw and said (for logging samples)."""

    consistency: torch.Tensor  # (N,) float32 in [0, 1]
    coherence: torch.Tensor  # (N,) float32 in [0, 1]
    judged_consistency: torch.Tensor  # (N,) bool: False where step 1 was missing (scored by the missing rule)
    judged_coherence: torch.Tensor  # (N,) bool: False where step 1 or 2 was missing
    consistency_replies: list = field(default_factory=list)  # N replies (sample mode) or None
    coherence_replies: list = field(default_factory=list)

    def components(self) -> dict[str, torch.Tensor]:
        """The `reflection=` argument of `emor3.rewards.combine.compute_rewards`."""
        return {"consistency": self.consistency, "coherence": self.coherence}


def _label_lists(taxonomies: Any, n: int) -> list[list[str]]:
    if isinstance(taxonomies, (list, tuple)) and taxonomies and not isinstance(taxonomies[0], str):
        if len(taxonomies) != n:
            raise ValueError(f"reflect: {len(taxonomies)} taxonomies for {n} completions")
        return [list(getattr(t, "labels", t)) for t in taxonomies]
    return [list(getattr(taxonomies, "labels", taxonomies))] * n


def reflect(
    completions: Sequence[str],
    labels: Sequence[str],
    taxonomies: Any,
    images: Sequence[Any],
    judge: Judge,
    *,
    mode: str = "sample",
    missing: str = "release",
    prompt: str = "clean",
    match: str = "lenient",
) -> ReflectionResult:
    """Score N completions with the two RER judges; see the module docstring for prompts and rules.

    labels: N ground-truth labels. taxonomies: one taxonomy (anything with `.labels`, or a label list) for all rows,
    or N of them. images: N images, row n's being its prompt's image (for a rollout: images[prompt_index[n]]).
    missing: the rule for completions whose judged steps are missing, a key of `MISSING_RULES`.
    prompt: the judge prompts' text, one of `JUDGE_PROMPTS` (release: which steps count as missing is the
    release's too: no span). match: how a sampled coherence reply is compared, one of `COHERENCE_MATCHES`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown RER mode {mode!r}; valid: {MODES}")
    if missing not in MISSING_RULES:
        raise ValueError(f"unknown RER missing-step rule {missing!r}; valid: {tuple(MISSING_RULES)}")
    if prompt not in JUDGE_PROMPTS:
        raise ValueError(f"unknown RER judge prompt {prompt!r}; valid: {JUDGE_PROMPTS}")
    if match not in COHERENCE_MATCHES:
        raise ValueError(f"unknown coherence match {match!r}; valid: {COHERENCE_MATCHES}")
    missing_cons, missing_coh = MISSING_RULES[missing]
    n = len(completions)
    if len(labels) != n or len(images) != n:
        raise ValueError(f"reflect: {n} completions but {len(labels)} labels and {len(images)} images")
    label_sets = _label_lists(taxonomies, n)

    cons = torch.full((n,), missing_cons, dtype=torch.float32)  # (N,)
    coh = torch.full((n,), missing_coh, dtype=torch.float32)  # (N,)
    if prompt == "release":
        spans = [release_spans(c) for c in completions]
        cons_rows = [i for i, (one, _) in enumerate(spans) if one]
        coh_rows = [i for i, (_, both) in enumerate(spans) if both]
    else:
        parses = [parse_set(c) for c in completions]
        cons_rows = [i for i, p in enumerate(parses) if p.step1]
        coh_rows = [i for i, p in enumerate(parses) if p.step1 and p.step2]
    for i in coh_rows:
        if labels[i] not in label_sets[i]:
            raise ValueError(f"reflect: row {i} label {labels[i]!r} is not one of its taxonomy labels {label_sets[i]}")
    if prompt == "release":
        cons_req = [release_consistency_request(spans[i][0], images[i]) for i in cons_rows]
        coh_req = [release_coherence_request(spans[i][1], label_sets[i]) for i in coh_rows]
    else:
        cons_req = [consistency_request(parses[i].step1, images[i]) for i in cons_rows]
        coh_req = [coherence_request(parses[i].step1, parses[i].step2, label_sets[i]) for i in coh_rows]
    cons_replies: list = [None] * n
    coh_replies: list = [None] * n

    if mode == "sample":
        # one batch per judge for the whole rollout batch
        if cons_req:
            for i, reply in zip(cons_rows, _checked(judge.generate(cons_req), len(cons_req), "consistency")):
                cons_replies[i] = reply
                cons[i] = score_consistency_reply(reply)
        if coh_req:
            for i, reply in zip(coh_rows, _checked(judge.generate(coh_req), len(coh_req), "coherence")):
                coh_replies[i] = reply
                coh[i] = score_coherence_reply(reply, labels[i], match)
    else:
        yes_no = list(YES_STRINGS + NO_STRINGS)
        if cons_req:
            lps = _checked(judge.choice_logprobs(cons_req, [yes_no] * len(cons_req)), len(cons_req), "consistency")
            for i, lp in zip(cons_rows, lps):
                cons[i] = consistency_from_logprobs(lp)
        if coh_req:
            lps = judge.choice_logprobs(coh_req, [label_sets[i] for i in coh_rows])
            for i, lp in zip(coh_rows, _checked(lps, len(coh_req), "coherence")):
                coh[i] = coherence_from_logprobs(lp, label_sets[i].index(labels[i]))

    judged_cons = torch.zeros(n, dtype=torch.bool)  # (N,)
    judged_cons[cons_rows] = True
    judged_coh = torch.zeros(n, dtype=torch.bool)  # (N,)
    judged_coh[coh_rows] = True
    return ReflectionResult(cons, coh, judged_cons, judged_coh, cons_replies, coh_replies)


def _checked(out: Sequence, n: int, what: str) -> Sequence:
    if len(out) != n:
        raise RuntimeError(f"RER {what} judge returned {len(out)} answers for {n} prompts")
    return out


# ------------------------------------------------------------------------------------------------ shared prefixes


def _common_prefix_length(rows: Sequence[list[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def split_shared_prefixes(batch: Any, images: Sequence[Any], image_token_id: int,
                          video_token_id: int | None = None) -> tuple[PromptBatch, PromptSuffix]:
    """Split the encoded judge prompts of ``batch`` (R left-padded rows, request r about ``images[r]``) into Q
    shared prefixes (a ``PromptBatch``, each image once) and R suffixes (a ``PromptSuffix``), so that prefix
    ``prefix_index[r]`` + suffix r is prompt r token for token, with the same M-RoPE positions.

    Requests about the same image object (the consistency questions of one GRPO group) form one group, text-only
    requests another; a group's prefix is the longest common prefix of its token ids, cut one token short of its
    shortest prompt so that every suffix holds at least the last token (whose logits start the reply). The image
    must lie inside the prefix; a group whose common part ends before its image tokens do (the requests differ
    before the image) is split into one prefix per request instead. Positions are copied from ``batch``, so a
    suffix token keeps the id it has in the whole prompt (text: its prefix's next id + its index, on all 3 axes).
    A request's visual may be a clip (`video_token_id` marks its tokens): the same rules hold, so each clip is
    encoded once per group."""
    ids, mask, pos = batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.position_ids.cpu()
    R, P = ids.shape
    assert len(images) == R, f"{len(images)} images for {R} prompts"
    if not bool(mask[:, -1].all()):
        raise ValueError("shared-prefix judging needs left-padded prompts (a real token in every prompt's last slot)")
    lens = mask.sum(-1).tolist()  # real tokens per prompt
    rows = [ids[r, P - lens[r]:].tolist() for r in range(R)]
    vision = {image_token_id} | ({video_token_id} if video_token_id is not None else set())
    groups: dict[Any, list[int]] = {}
    for r, im in enumerate(images):
        groups.setdefault(None if im is None else id(im), []).append(r)

    prefixes: list[tuple[int, int]] = []  # (representative row, prefix length), one per prefix
    prefix_index = [0] * R
    for members in groups.values():
        n = min(_common_prefix_length([rows[m] for m in members]), min(lens[m] for m in members) - 1)
        img = [i for i, t in enumerate(rows[members[0]]) if t in vision]
        parts = [members] if not img or img[-1] < n else [[m] for m in members]
        for part in parts:
            cut = n if len(parts) == 1 else lens[part[0]] - 1
            prefix_index_q = len(prefixes)
            prefixes.append((part[0], cut))
            for m in part:
                prefix_index[m] = prefix_index_q

    Q, Pp = len(prefixes), max(c for _, c in prefixes)
    p_ids = torch.zeros(Q, Pp, dtype=ids.dtype)  # (Q, Pp) left-padded
    p_mask = torch.zeros(Q, Pp, dtype=mask.dtype)  # (Q, Pp)
    p_pos = torch.zeros(3, Q, Pp, dtype=pos.dtype)  # (3, Q, Pp)
    p_next = torch.zeros(Q, dtype=torch.long)  # (Q,)
    for q, (r, n) in enumerate(prefixes):
        a = P - lens[r]
        p_ids[q, Pp - n:], p_mask[q, Pp - n:], p_pos[:, q, Pp - n:] = ids[r, a:a + n], 1, pos[:, r, a:a + n]
        p_next[q] = pos[0, r, a + n]  # the first suffix token's id: a text token, the same on all 3 axes
    index = torch.tensor(prefix_index, dtype=torch.long)  # (R,)
    cuts = torch.tensor([prefixes[q][1] for q in prefix_index])  # (R,) prefix length of each row
    s_len = torch.tensor(lens) - cuts  # (R,) suffix tokens, >= 1
    L = int(s_len.max())
    keep = torch.arange(L)[None, :] >= L - s_len[:, None]  # (R, L): the suffix's real slots
    s_ids, s_mask, s_pos = ids[:, P - L:], keep.to(mask.dtype), pos[:, :, P - L:] * keep  # (R, L), (R, L), (3, R, L)
    s_ids = s_ids.masked_fill(~keep, 0)
    assert not any(bool((s_ids[keep] == t).any()) for t in vision), \
        "a suffix holds image or video tokens: the prefix split is wrong"
    steps = s_mask.cumsum(-1) - 1  # (R, L): index among the suffix's real tokens
    want = (p_next.index_select(0, index)[:, None] + steps) * keep  # (R, L)
    assert bool((s_pos == want[None]).all()), "suffix positions must count on from the prefix's (text tokens)"
    # prefix q holds the image or clip of its representative request (one visual or none per request, laid out by
    # the processor request by request)
    visuals = select_visuals(batch, [r for r, _ in prefixes],
                             num_images=[int(v is not None and not is_clip(v)) for v in images],
                             num_videos=[int(is_clip(v)) for v in images])
    prefix = PromptBatch(p_ids, p_mask, p_pos, next_position=p_next, **visuals)
    return prefix, PromptSuffix(index, s_ids, s_mask, s_pos, batch.next_position.cpu())


# ---------------------------------------------------------------------------------------------------- model judge


class ModelJudge:
    """The emor3 model as judge: pass the policy (the paper) or the frozen reference model (option).

    Sample mode goes through `emor3.engine.sampler.sample` (one reply per prompt, stop at <|im_end|>, vision special
    tokens banned); logprob mode runs one prefill of the prompts into a KV cache (`emor3.engine.sampler.prefill`),
    copies it to the K choices of each prompt, and scores all choice tokens in one forward. `share_prefix` (default
    True) prefills the prefix that requests about one image share once (module docstring, "Batching"); False
    prefills every request whole (the reference the shared path is tested against). Both under
    torch.inference_mode (no gradient, no autograd state kept). The model's train/eval mode is left as it is
    (Qwen-VL has no dropout).
    `max_batch_size` splits a judge batch into chunks of that many prompts (None: one batch). `max_new_tokens` caps
    a sampled reply: 32 by default, room for an instruct model's "Based on the image, yes." (the release lets the
    judge write up to the rollout's response length; a run sets it with --reward.judge-max-new-tokens).
    """

    def __init__(self, model: Any, processor: Any, *, temperature: float = 0.6, top_p: float = 0.95,
                 max_new_tokens: int = 32, seed: int | torch.Generator = 0, max_batch_size: int | None = None,
                 logit_chunk: int = 256, share_prefix: bool = True):
        self.model, self.processor = model, processor
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.max_batch_size, self.logit_chunk, self.share_prefix = max_batch_size, logit_chunk, share_prefix
        device = next(model.parameters()).device
        if isinstance(seed, torch.Generator):
            self.generator = seed
        else:  # one generator for the judge's lifetime: successive calls differ, a seeded run repeats
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(seed))
        self.device = device

    # -- helpers
    def _chunks(self, n: int) -> list[range]:
        step = self.max_batch_size or max(n, 1)
        return [range(s, min(s + step, n)) for s in range(0, n, step)]

    def encode(self, requests: Sequence[JudgeRequest]):
        """The `PromptBatch` of a list of judge requests (on the model's device)."""
        batch = self._encode_host(requests)
        to = getattr(batch, "to", None)
        return to(self.device) if callable(to) else batch

    def _encode_host(self, requests: Sequence[JudgeRequest]):
        # a Thinking model's judge replies right away, after an empty reasoning block: the yes / no / label is read
        # from the reply's first tokens
        kw = {"close_thinking": True} if getattr(self.processor, "thinking", False) else {}
        return self.processor.encode_prompts(
            [r.messages for r in requests], [[r.image] if r.image is not None else [] for r in requests], **kw
        )

    def prompts(self, requests: Sequence[JudgeRequest]) -> tuple[Any, PromptSuffix | None]:
        """What the engine runs for these requests: their `PromptBatch` and no suffix, or, with `share_prefix`,
        the shared prefixes and the requests' suffixes (`split_shared_prefixes`), on the model's device."""
        if not self.share_prefix:
            return self.encode(requests), None
        prefixes, suffix = split_shared_prefixes(self._encode_host(requests), [r.image for r in requests],
                                                 self.model.config.image_token_id,
                                                 getattr(self.model.config, "video_token_id", None))
        return prefixes.to(self.device), suffix

    # -- sample mode
    def generate(self, requests: Sequence[JudgeRequest]) -> list[str]:
        out: list[str] = []
        with torch.inference_mode():
            for rows in self._chunks(len(requests)):
                batch, suffix = self.prompts([requests[i] for i in rows])
                roll = sample(
                    self.model, batch, group_size=1, max_new_tokens=self.max_new_tokens,
                    temperature=self.temperature, top_p=self.top_p,
                    stop_token_ids=self.processor.stop_token_ids, banned_token_ids=self.processor.banned_token_ids,
                    generator=self.generator, tokenizer=self.processor, suffix=suffix,
                )
                out.extend(roll.texts)
        return out

    # -- logprob mode
    def _choice_ids(self, choice: str) -> list[int]:
        tok = getattr(self.processor, "tokenizer", self.processor)
        ids = tok.encode(choice, add_special_tokens=False)
        if not ids:
            raise ValueError(f"RER logprob judge: choice {choice!r} tokenises to nothing")
        return list(ids)

    def choice_logprobs(self, requests: Sequence[JudgeRequest], choices: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        assert len(requests) == len(choices), "one choice list per request"
        out: list[torch.Tensor | None] = [None] * len(requests)
        # requests sharing a choice list (the usual case: one taxonomy) share one tokenised choice tensor
        groups: dict[tuple, list[int]] = {}
        for r, c in enumerate(choices):
            groups.setdefault(tuple(c), []).append(r)
        with torch.inference_mode():
            for choice_tuple, members in groups.items():
                ids = [self._choice_ids(c) for c in choice_tuple]
                for rows in self._chunks(len(members)):
                    sub = [members[i] for i in rows]
                    lp = self._score_choices([requests[r] for r in sub], ids)  # (R, K)
                    for j, r in enumerate(sub):
                        out[r] = lp[j].float().cpu()
        return out  # type: ignore[return-value]

    def _score_choices(self, requests: Sequence[JudgeRequest], choice_ids: list[list[int]]) -> torch.Tensor:
        """(R, K) summed log-probs of each choice's tokens as the reply's start, one prefill per prompt (with
        `share_prefix`: one per shared prefix, then the prompts' own tokens)."""
        model, dev = self.model, self.device
        batch, suffix = self.prompts(requests)
        K, L = len(choice_ids), max(len(c) for c in choice_ids)
        cids = torch.zeros(K, L, dtype=torch.long, device=dev)  # (K, L) right-padded with id 0, masked below
        cmask = torch.zeros(K, L, dtype=torch.float32, device=dev)  # (K, L)
        for k, c in enumerate(choice_ids):
            cids[k, : len(c)] = torch.tensor(c, dtype=torch.long)
            cmask[k, : len(c)] = 1.0
        pre = prefill(model, batch, L - 1, suffix=suffix)  # R prompts in a cache with room for L - 1 choice tokens
        R, P = pre.last_logits.shape[0], pre.length
        first = torch.log_softmax(pre.last_logits.float(), dim=-1)  # (R, V): reply's first token
        lp = first[:, cids[:, 0]]  # (R, K)
        if L > 1:
            # feed choice tokens 0..L-2 of every (prompt, choice) pair; they predict choice tokens 1..L-1
            cache = pre.cache.repeat_interleave(K)
            fed = cids[:, : L - 1].repeat(R, 1)  # (R*K, L-1): row r*K + k is prompt r, choice k
            pos = decode_position_ids(pre.next_position.repeat_interleave(K), 0, L - 1)  # (3, R*K, L-1)
            h = model(fed, pos, pre.attention_mask.repeat_interleave(K, dim=0), cache=cache,
                      cache_position=torch.arange(P, P + L - 1, device=dev))  # (R*K, L-1, D)
            tgt = cids[:, 1:].repeat(R, 1)  # (R*K, L-1)
            rest = torch.empty(R * K, L - 1, dtype=torch.float32, device=dev)  # (R*K, L-1)
            flat_h, flat_t = h.reshape(R * K * (L - 1), -1), tgt.reshape(-1)
            flat_out = rest.view(-1)
            for s in range(0, flat_h.shape[0], self.logit_chunk):  # never the whole (R*K, L-1, V) logits tensor
                logits = model.logits(flat_h[s : s + self.logit_chunk]).float()  # (c, V)
                flat_out[s : s + self.logit_chunk] = (
                    logits.gather(-1, flat_t[s : s + self.logit_chunk, None]).squeeze(-1) - logits.logsumexp(-1)
                )
            rest = rest * cmask[:, 1:].repeat(R, 1)  # (R*K, L-1): padded choice positions count 0
            lp = lp + rest.sum(-1).view(R, K)
        assert lp.shape == (R, K), f"choice log-probs {tuple(lp.shape)} != {(R, K)}"
        return lp


__all__ = [
    "CONSISTENCY_QUESTION", "COHERENCE_QUESTION", "COHERENCE_INSTRUCTION", "JudgeRequest", "Judge", "ModelJudge",
    "ReflectionResult", "reflect", "MISSING_RULES", "JUDGE_PROMPTS", "COHERENCE_MATCHES", "consistency_request",
    "coherence_request", "release_spans", "release_consistency_request", "release_coherence_request",
    "RELEASE_CONSISTENCY_QUESTION", "score_consistency_reply",
    "score_coherence_reply", "consistency_from_logprobs", "coherence_from_logprobs", "words", "split_shared_prefixes",
]

