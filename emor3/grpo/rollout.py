"""The rollout phase of a GRPO step: prompts from the shared stream -> sampled completions -> rewards, as one
typed, scored batch.

1. ``ScoredBatch`` is what a step trains on: B prompts (a ``PromptBatch``), their N = B·G completions (a
   ``Rollout``, row n continuing prompt n // G), the rewards of every row (a ``RewardBreakdown``), once computed
   the group-relative advantages, and what samples.jsonl records of each row (``row_records``). ``select`` keeps
   whole prompts with their G rows, ``cat`` stacks batches; both carry every field of every part, so rows and
   prompts stay aligned.
2. ``score_prompts``: dataset rows -> SET prompts -> ``sample`` G completions each -> RER judgements (the current
   policy or the frozen reference answers two questions about each completion, no gradient) -> rewards, plus
   DAPO's soft overlong penalty when the algorithm has one.
3. ``PromptStream``: training prompts in a fresh seeded permutation each epoch; its position is trainer state.
   ``collect_step``: the step's ``prompts_per_step`` prompts from the shared, seeded stream; this rank scores its
   contiguous share (all of it on one process) in chunks of ``--grpo.sample-chunk`` prompts, each under a
   generator seeded from (seed, the chunk's absolute stream position), so a prompt's completions do not depend on
   the number of ranks.
4. ``collect``: ``collect_step``, then, for DAPO, dynamic sampling: groups whose rewards are all equal are dropped
   and refilled from fresh prompts (DAPO sec. 3.2), up to ``--grpo.max-refill`` extra rounds.

Shape legend: B prompts, G samples per prompt, N = B·G rows, T completion length.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from emor3 import distributed as dist
from emor3.config import Config
from emor3.data.dataset import EmotionDataset
from emor3.engine.prompts import encode_samples, sample_prompt
from emor3.engine.sampler import Rollout, group_rows, sample
from emor3.engine.scoring import concat_prompt_batches, prompt_slice
from emor3.grpo.objective import dynamic_sampling_keep, overlong_penalty
from emor3.models.processing import Processor, PromptBatch
from emor3.rewards import RewardBreakdown, compute_rewards
from emor3.rewards.reflection import ModelJudge, reflect


def _per_row(x, fn):
    """fn applied to every per-row tensor in x (a tensor, or a dict of them); anything else (weights) as it is."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _per_row(v, fn) for k, v in x.items()}
    return x


def _map_rewards(r: RewardBreakdown, fn) -> RewardBreakdown:
    """fn applied to every per-row tensor of every field of a RewardBreakdown (total, components, extras)."""
    return dataclasses.replace(r, **{f.name: _per_row(getattr(r, f.name), fn) for f in dataclasses.fields(r)})


def _cat_rewards(rs: Sequence[RewardBreakdown]) -> RewardBreakdown:
    """RewardBreakdowns of consecutive rows stacked, field by field (weights from the first)."""
    def cat(xs):
        if isinstance(xs[0], torch.Tensor):
            return torch.cat(list(xs))
        if isinstance(xs[0], dict):
            return {k: cat([x[k] for x in xs]) for k in xs[0]}
        return xs[0]

    return dataclasses.replace(rs[0], **{f.name: cat([getattr(r, f.name) for r in rs]) for f in dataclasses.fields(rs[0])})


@dataclass
class ScoredBatch:
    """One scored rollout batch: B prompts, N = B·G completions (row n samples prompt n // G), their rewards."""

    prompts: PromptBatch  # B prompts, left-padded, with their images
    rollout: Rollout  # N completions: ids, mask, sampler log-probs (N, T); texts, truncation flags
    rewards: RewardBreakdown  # total (N,), every component and extra (N,)
    advantages: torch.Tensor | None = None  # (N,) float32, group-relative; None until computed
    # N dicts, what samples.jsonl records of a row besides its text and rewards: the sample's id, image path,
    # label, taxonomy, true cues (EmoScenes) and the RER judge's replies (``row_records``)
    records: list = field(default_factory=list)

    @property
    def group_size(self) -> int:
        return self.rollout.group_size

    @property
    def num_prompts(self) -> int:
        return self.prompts.input_ids.shape[0]

    def select(self, prompts: torch.Tensor) -> "ScoredBatch":
        """The prompts ``prompts`` (B',) long, in that order, with their G rows of completions, rewards and
        advantages."""
        prompts = prompts.flatten().cpu()
        rows = group_rows(prompts, self.group_size)  # (B'·G,)
        return ScoredBatch(
            prompt_slice(self.prompts, prompts), self.rollout.select(prompts),
            _map_rewards(self.rewards, lambda t: t[rows.to(t.device)]),
            None if self.advantages is None else self.advantages[rows.to(self.advantages.device)],
            [self.records[i] for i in rows.tolist()] if self.records else [],
        )

    @staticmethod
    def cat(batches: Sequence["ScoredBatch"], pad_token_id: int) -> "ScoredBatch":
        """Batches of different prompts stacked into one: prompts left-padded, completions right-padded."""
        if len(batches) == 1:
            return batches[0]
        advantages = [b.advantages for b in batches]
        return ScoredBatch(
            concat_prompt_batches([b.prompts for b in batches], pad_token_id),
            Rollout.cat([b.rollout for b in batches], pad_token_id),
            _cat_rewards([b.rewards for b in batches]),
            None if any(a is None for a in advantages) else torch.cat(advantages),
            [r for b in batches for r in b.records] if all(b.records for b in batches) else [],
        )

    def gathered_rewards(self) -> RewardBreakdown:
        """Every rank's rewards, rows in global prompt order (the single-process batch; for metrics)."""
        return _map_rewards(self.rewards, dist.gather_rows)


# --------------------------------------------------------------------------------------------- sampling + scoring


# stride of each random stream of a run (``stream_seed``)
_SEED_STRIDE = {"prompt_order": 100_003, "sampling": 1_000_003, "update_order": 1}


def stream_seed(seed: int, stream: str, position: int) -> int:
    """The seed of one random stream of a run: (run seed · stride + position) mod 2^63, one stride per stream.

    - ``prompt_order`` (stride 100 003): the prompt permutation of epoch ``position`` (``PromptStream``);
    - ``sampling`` (stride 1 000 003): rollouts (and their RER judge replies) of the prompt chunk that starts at
      absolute stream position ``position``, so a prompt's completions do not depend on the number of ranks;
    - ``update_order`` (stride 1): the mini-batch order of update epoch e of step s, ``position`` = 131·s + e.
    Run seeds are below 2^32 (``emor3.config.SEED_LIMIT``), so the modulus never wraps a valid run's seed."""
    return (seed * _SEED_STRIDE[stream] + position) % 2**63


class PromptStream:
    """Training prompts in a fresh seeded permutation each epoch. Its position is part of the trainer state, so a
    resumed run sees exactly the prompts it would have seen."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        if n == 0:
            raise ValueError("the training set is empty")
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(stream_seed(self.seed, "prompt_order", self.epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}




def row_records(samples: Sequence, rows: Sequence[int], reflection=None) -> list[dict]:
    """What samples.jsonl keeps of each completion row besides its text and rewards: its sample's id, image (an
    absolute path, a parquet dataset's `<shard>.parquet#<row>`, or an in-memory source's key), label and
    taxonomy, the true cues where the sample records them (EmoScenes), and the RER judge's replies (None where the
    judge was not asked) when ``reflection`` (a ``ReflectionResult``) is given."""
    out = []
    for n, p in enumerate(rows):
        s = samples[p]
        image = str(Path(s.image).resolve()) if isinstance(s.image, (str, Path)) else \
            getattr(s.image, "origin", None) or s.image.key  # a parquet row's image: <shard>.parquet#<row>
        r = {"id": s.id, "image": image, "label": s.label, "taxonomy": s.taxonomy}
        if isinstance(s.metadata, dict) and s.metadata.get("cues"):
            r["cues"] = s.metadata["cues"]
        if reflection is not None:
            r["consistency_reply"] = reflection.consistency_replies[n]
            r["coherence_reply"] = reflection.coherence_replies[n]
        out.append(r)
    return out


@dataclass(frozen=True)
class RolloutSetup:
    """What a rollout reads besides the config: the policy that samples, the model that answers RER's questions
    (the policy, or with ``--reward.judge reference`` the frozen reference), the training prompts and their
    taxonomies, the processor and the reward setup."""

    model: torch.nn.Module
    judge: torch.nn.Module | None
    processor: Processor
    train_set: EmotionDataset
    taxonomies: dict  # name -> Taxonomy
    reward_weights: dict
    plugins: tuple
    device: torch.device


def score_prompts(setup: RolloutSetup, cfg: Config, indices: list[int],
                  generator: torch.Generator) -> tuple[ScoredBatch, float]:
    """Dataset rows ``indices`` -> (their ScoredBatch, seconds spent judging and scoring)."""
    g = cfg.grpo
    samples = [setup.train_set[i] for i in indices]
    images = [setup.train_set.image(i) for i in indices]
    prompts = encode_samples(setup.processor, samples, images, setup.taxonomies).to(setup.device)
    rollout = sample(
        setup.model, prompts, group_size=g.group_size, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
        top_p=g.top_p, top_k=g.top_k, stop_token_ids=setup.processor.stop_token_ids,
        banned_token_ids=setup.processor.banned_token_ids, generator=generator, tokenizer=setup.processor,
        compile={"off": False, "on": True}.get(g.compile, g.compile), shared_prefix_decode=g.shared_prefix_decode,
    )
    t0 = time.perf_counter()
    rows = rollout.prompt_index.tolist()
    labels = [samples[i].label for i in rows]
    taxes = [setup.taxonomies[samples[i].taxonomy] for i in rows]
    # what the rewards read: a Thinking model's completions minus their reasoning block (Processor.answer)
    answers = [setup.processor.answer(t) for t in rollout.texts]
    reflection = None
    algo = cfg.algorithm()
    if algo.reflection:  # RER: the judge answers about every completion, one batch per question, no grad
        judge = ModelJudge(setup.judge, setup.processor,
                           max_new_tokens=cfg.reward.judge_max_new_tokens, seed=generator,
                           share_prefix=cfg.reward.judge_share_prefix)
        reflection = reflect(answers, labels, taxes, [images[i] for i in rows], judge,
                             mode=cfg.reward.judge_mode, missing=cfg.reward.missing_step,
                             prompt=cfg.reward.judge_prompt, match=cfg.reward.coherence_match)
    rewards = compute_rewards(
        answers, labels, taxonomies=taxes, weights=setup.reward_weights,
        reflection=None if reflection is None else reflection.components(),
        plugins=setup.plugins, prompts=[sample_prompt(samples[i], setup.taxonomies) for i in rows],
        columns={"id": [samples[i].id for i in rows]},
        strict_format=cfg.reward.format == "strict", normalized_accuracy=cfg.reward.accuracy == "normalized",
        on_all_nan=cfg.reward.plugin_all_nan,
    )
    if algo.overlong_buffer > 0:  # DAPO's soft overlong punishment: a term of weight 1 added to the total
        max_len = g.max_new_tokens
        penalty = overlong_penalty(rollout.lengths, max_len=max_len, buffer=max(1, int(algo.overlong_buffer * max_len)))
        rewards = dataclasses.replace(rewards, total=rewards.total + penalty,
                                      components={**rewards.components, "overlong_penalty": penalty},
                                      weights={**rewards.weights, "overlong_penalty": 1.0})
    batch = ScoredBatch(prompts, rollout, rewards, records=row_records(samples, rows, reflection))
    return batch, time.perf_counter() - t0


def collect_step(setup: RolloutSetup, cfg: Config, stream: PromptStream) -> tuple[ScoredBatch, float]:
    """This rank's share of the step's prompts from ``stream``, sampled and scored chunk by chunk
    -> (ScoredBatch, judge seconds)."""
    g = cfg.grpo
    first = stream.epoch * stream.n + stream.pos  # absolute position of the next prompt in the stream
    offset, mine = dist.shard(stream.take(g.prompts_per_step))
    chunk = g.sample_chunk or len(mine)
    if len(mine) % chunk:
        raise ValueError(f"--grpo.sample-chunk {chunk} must divide the prompts per rank ({len(mine)})")
    parts, t_judge = [], 0.0
    for s in range(0, len(mine), chunk):
        seed = stream_seed(cfg.run.seed, "sampling", first + offset + s)
        generator = torch.Generator(device=setup.device).manual_seed(seed)
        part, dt = score_prompts(setup, cfg, mine[s : s + chunk], generator)
        parts.append(part)
        t_judge += dt
    return ScoredBatch.cat(parts, setup.processor.stop_token_ids[0]), t_judge


def collect(setup: RolloutSetup, cfg: Config, stream: PromptStream) -> tuple[ScoredBatch | None, float, dict]:
    """The step's scored batch (None when DAPO kept no group), judge seconds, and DAPO's counts."""
    batch, t_judge = collect_step(setup, cfg, stream)
    if not cfg.algorithm().dynamic_sampling:
        return batch, t_judge, {}
    g = cfg.grpo
    kept, n_kept, filtered, refills = [], 0, 0, 0
    while True:
        keep = dynamic_sampling_keep(batch.rewards.total.view(-1, g.group_size))  # (B,) informative groups
        filtered += int((~keep).sum())
        if bool(keep.any()):
            kept.append(batch.select(keep.nonzero().flatten()))
            n_kept += int(keep.sum())
        if n_kept >= g.prompts_per_step or refills >= g.max_refill:
            break
        refills += 1
        batch, dt = collect_step(setup, cfg, stream)
        t_judge += dt
    stats = {"dapo/filtered_groups": filtered, "dapo/refill_rounds": refills, "dapo/kept_groups": n_kept}
    if not kept:
        return None, t_judge, stats
    batch = ScoredBatch.cat(kept, setup.processor.stop_token_ids[0])
    if n_kept > g.prompts_per_step:  # keep exactly one rollout batch
        batch = batch.select(torch.arange(g.prompts_per_step))
    return batch, t_judge, stats
