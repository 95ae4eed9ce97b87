"""python -m emor3.grpo.train: the whole EMO-R3 run. Cold-Start SFT, GRPO with SET and RER, evaluation.

With no arguments it runs the embedded default on a CPU in minutes: a tiny Qwen2.5-VL-architecture model with a
tokenizer trained offline, the synthetic EmoScenes benchmark, Cold-Start SFT on ~100 SET traces, GRPO with the
``emo_r3`` preset, then the paper-style accuracy table. ``--model PATH`` starts from a Qwen2-VL / Qwen2.5-VL
checkpoint folder instead, ``--data`` / ``--eval-data`` take datasets in the loaders' formats, ``--config FILE`` a
TOML recipe (examples/). Every flag: ``--help``.

How one step departs from textbook GRPO (Shao et al. 2024), and the choices made here:
1. Prompts use SET (EMO-R3 sec. 3.1): the question lists the sample's taxonomy labels, the model reasons in
   <step1..3> and boxes its answer. Rewards are outcome rewards, one scalar per completion.
2. The reward (EMO-R3 sec. 3.2) is accuracy + format + RER. RER asks the *current policy* (the paper; the frozen
   reference is an option) two questions about its own reasoning, with no gradient: does step 1 describe the image
   (the image really is passed: the authors' first release forgot it), and which emotion do steps 1-2 express (the
   labels come from the sample's taxonomy: the release hard-coded Mikels' eight). A model trained from scratch
   learns to answer these questions in Cold-Start SFT (``--sft.judge-examples``). Total: the paper's
   0.8·acc + 0.1·(cons + coh)/2 + 0.1·format by default; the release's 0.8/0.1/0.1/0.1 is the "release" preset.
3. Advantages: group mean and unbiased std (GRPO), computed in ``objective.group_advantages``; unscorable
   completions (NaN) get advantage 0.
4. KL to the frozen reference (the model after Cold-Start SFT) is in the loss, k3 with β = 0.01 (the paper);
   β = 0 (DAPO, Dr.GRPO, GSPO) never builds the reference model.
5. Loss: clipped surrogate with clip 0.2 / 0.3 and dual clip 3 (the paper), token-mean over the mini-batch. The
   denominator is computed once per mini-batch (``objective.loss_normalizer``), so gradient accumulation over
   micro-batches gives exactly the mini-batch gradient.
6. Old log-probs: with one update per rollout batch (the paper's default: μ = 1 and one mini-batch) the policy
   has not moved since sampling, so old = current, detached, and the ratio is exactly 1 (the loss then is the
   policy-gradient surrogate). With several updates per batch the trainer recomputes old log-probs before the first
   update, as verl does; the sampler's own log-probs are only compared (metric ``logp_gap``), never trusted.
7. A prompt's image is encoded once per micro-batch and shared by its G rows; the vision tower is trained (the
   paper) unless ``--model.freeze-vision``.
8. A step whose gradient norm is not finite is skipped (no optimizer step) and reported in the metrics.
9. DAPO (``--algo dapo``): groups whose rewards are all equal are dropped and replaced by fresh prompts, up to
   ``--grpo.max-refill`` extra rollout rounds; the soft overlong penalty is added to the reward.
10. Sampling randomness is seeded per chunk of ``--grpo.sample-chunk`` prompts from (run seed, the chunk's position
   in the prompt stream), not from one generator running through the step. The default (0) samples a rank's whole
   share in one batch; a chunk size that divides every rank's share (1 always does) makes a prompt's G completions
   the same on any number of ranks.
11. Under ``torchrun`` (``emor3.distributed``): every rank draws the step's prompts from the same seeded stream
   and samples, scores and trains on its contiguous share (a group never spans ranks, so advantages are the
   single-process ones); the loss normaliser is summed over ranks and the backward loss multiplied by the world
   size (FSDP/DDP average gradients), so the update equals the single-process update of the same global batch;
   metrics are reduced over ranks; rank 0 alone logs, checkpoints and evaluates.

Shape legend: B prompts, G samples per prompt, N = B·G rows, T completion length, P prompt length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from emor3 import distributed as dist
from emor3.config import Config, parse_args, save_config
from emor3.experiment import Experiment, build_experiment, load_trainer_state, save_checkpoint
from emor3.grpo.objective import (
    aggregate,
    dynamic_sampling_keep,
    group_advantages,
    kl_penalty,
    loss_normalizer,
    overlong_penalty,
    policy_loss,
)
from emor3.grpo.rollout import concat_prompt_batches, encode_samples, prompt_slice
from emor3.grpo.sampler import Rollout, sample
from emor3.rewards import RewardBreakdown, compute_rewards
from emor3.rewards.reflection import ModelJudge, reflect

DESCRIPTION = (__doc__ or "").split("\n\n")[0] + "\n\n" + (__doc__ or "").split("\n\n")[1]


# --------------------------------------------------------------------------------------------- logging sinks


class MetricsSink:
    """metrics.jsonl (one JSON object per step) and samples.jsonl, plus TensorBoard or W&B when asked for and
    installed. ``NullSink`` has the same methods and writes nothing, so the loop never asks whether to log."""

    def __init__(self, out: Path, logger: str = "jsonl", config: dict | None = None):
        self.metrics = open(out / "metrics.jsonl", "a")
        self.samples = open(out / "samples.jsonl", "a")
        self.tb = self.wandb = None
        if logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("[emor3] --run.logger tensorboard: tensorboard is not installed; logging to metrics.jsonl only")
        elif logger == "wandb":
            try:
                import wandb

                self.wandb = wandb.init(project="emor3", dir=str(out), config=config or {})
            except ImportError:
                print("[emor3] --run.logger wandb: wandb is not installed; logging to metrics.jsonl only")
        elif logger != "jsonl":
            raise ValueError(f"unknown --run.logger {logger!r}; valid: jsonl, tensorboard, wandb")

    def log(self, step: int, metrics: dict) -> None:
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        for row in rows:
            self.samples.write(json.dumps({"step": step, **row}) + "\n")
        self.samples.flush()

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullSink:
    def log(self, step: int, metrics: dict) -> None: ...
    def log_samples(self, step: int, rows: list[dict]) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------- helpers


class PromptStream:
    """Training prompts in a fresh seeded permutation each epoch. Its position is part of the trainer state, so a
    resumed run sees exactly the prompts it would have seen."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        if n == 0:
            raise ValueError("the training set is empty")
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
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


def lr_lambda(warmup: int, total: int, schedule: str):
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown --grpo.schedule {schedule!r}; valid: constant, cosine")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # pragma: no cover
        return float("nan")


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop checkpoints after the current step and exits cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[emor3] received {signal.Signals(signum).name}: checkpointing after this step, then exiting")

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------- rollout phase


def rollout_batch(exp: Experiment, cfg: Config, indices: list[int], generator: torch.Generator):
    """Prompts for dataset rows ``indices`` -> (PromptBatch, Rollout, RewardBreakdown, judge seconds)."""
    g = cfg.grpo
    samples = [exp.train_set[i] for i in indices]
    images = [exp.train_set.image(i) for i in indices]
    batch = encode_samples(exp.processor, samples, images, exp.taxonomies).to(exp.device)
    rollout = sample(
        exp.model, batch, group_size=g.group_size, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
        top_p=g.top_p, top_k=g.top_k, stop_token_ids=exp.processor.stop_token_ids,
        banned_token_ids=exp.processor.banned_token_ids, generator=generator, tokenizer=exp.processor,
    )
    t0 = time.perf_counter()
    rows = rollout.prompt_index.tolist()
    labels = [samples[i].label for i in rows]
    taxes = [exp.taxonomies[samples[i].taxonomy] for i in rows]
    # what the rewards read: a Thinking model's completions minus their reasoning block (Processor.answer)
    answers = [exp.processor.answer(t) for t in rollout.texts]
    reflection = None
    if exp.algo.reflection:  # RER: the judge answers about every completion, one batch per question, no grad
        judge = ModelJudge(exp.reference if cfg.reward.judge == "reference" else exp.model, exp.processor,
                           max_new_tokens=cfg.reward.judge_max_new_tokens, seed=generator)
        reflection = reflect(answers, labels, taxes, [images[i] for i in rows], judge,
                             mode=cfg.reward.judge_mode).components()
    rewards = compute_rewards(
        answers, labels, taxonomies=taxes, weights=exp.reward_weights, reflection=reflection,
        plugins=exp.plugins, prompts=[exp.prompt_text(samples[i]) for i in rows],
        columns={"id": [samples[i].id for i in rows]},
        strict_format=cfg.reward.format == "strict", normalized_accuracy=cfg.reward.accuracy == "normalized",
    )
    if exp.algo.overlong_buffer > 0:  # DAPO's soft overlong punishment, added to the total reward
        max_len = g.max_new_tokens
        buffer = max(1, int(exp.algo.overlong_buffer * max_len))
        rewards = add_reward_term(rewards, "overlong_penalty", overlong_penalty(rollout.lengths, max_len=max_len, buffer=buffer))
    return batch, rollout, rewards, time.perf_counter() - t0


def chunk_seed(seed: int, position: int) -> int:
    """Seed of the sampling generator of the prompt chunk starting at absolute stream ``position``."""
    return (seed * 1_000_003 + position) % 2**63


def rollout_step(exp: Experiment, cfg: Config, stream: "PromptStream"):
    """The step's ``prompts_per_step`` prompts from the shared stream; this rank samples and scores its contiguous
    share (all of them on one process), in chunks of ``--grpo.sample-chunk`` prompts, each chunk with a generator
    seeded from (seed, absolute stream position of its first prompt): the rollout of a prompt does not depend on
    the number of ranks. -> (PromptBatch, Rollout, RewardBreakdown, judge seconds) of this rank's prompts."""
    g = cfg.grpo
    first = stream.epoch * stream.n + stream.pos  # absolute position of the next prompt in the stream
    offset, mine = dist.shard(stream.take(g.prompts_per_step))
    chunk = g.sample_chunk or len(mine)
    if len(mine) % chunk:
        raise ValueError(f"--grpo.sample-chunk {chunk} must divide the prompts per rank ({len(mine)})")
    rounds = []
    for s in range(0, len(mine), chunk):
        generator = torch.Generator(device=exp.device).manual_seed(chunk_seed(cfg.run.seed, first + offset + s))
        rounds.append(rollout_batch(exp, cfg, mine[s : s + chunk], generator))
    t_judge = sum(r[3] for r in rounds)
    if len(rounds) == 1:
        return (*rounds[0][:3], t_judge)
    return (*concat_rounds([r[:3] for r in rounds], exp.processor.stop_token_ids[0]), t_judge)


def gather_rewards(r: RewardBreakdown) -> RewardBreakdown:
    """Every rank's rows of a RewardBreakdown, in global prompt order (for metrics over the global batch)."""
    return RewardBreakdown(dist.gather_rows(r.total), {k: dist.gather_rows(v) for k, v in r.components.items()},
                           dict(r.weights), {k: dist.gather_rows(v) for k, v in r.extras.items()})


def select_rewards(r: RewardBreakdown, rows: torch.Tensor) -> RewardBreakdown:
    return RewardBreakdown(r.total[rows], {k: v[rows] for k, v in r.components.items()}, dict(r.weights),
                           {k: v[rows] for k, v in r.extras.items()})


def add_reward_term(r: RewardBreakdown, name: str, values: torch.Tensor) -> RewardBreakdown:
    """A term added to the total with weight 1 and logged as a component (DAPO's overlong penalty)."""
    return RewardBreakdown(r.total + values, {**r.components, name: values}, {**r.weights, name: 1.0}, dict(r.extras))


def select_groups(batch, rollout: Rollout, rewards: RewardBreakdown, keep: torch.Tensor):
    """Keep the prompts (B,) where ``keep`` is True, with their G rows."""
    G = rollout.group_size
    prompts = keep.nonzero().flatten().cpu()  # (B',)
    rows = (prompts[:, None] * G + torch.arange(G)).flatten()  # (B'·G,)
    dev = rollout.prompt_index.device
    rollout = dataclasses.replace(
        rollout,
        prompt_index=torch.arange(len(prompts), device=dev).repeat_interleave(G),
        completion_ids=rollout.completion_ids[rows.to(dev)], completion_mask=rollout.completion_mask[rows.to(dev)],
        logprobs=rollout.logprobs[rows.to(dev)], truncated=rollout.truncated[rows.to(dev)],
        texts=[rollout.texts[i] for i in rows.tolist()],
        truncation_logmass=None if rollout.truncation_logmass is None else rollout.truncation_logmass[rows.to(dev)],
    )
    return prompt_slice(batch, prompts), rollout, select_rewards(rewards, rows)


def concat_rounds(rounds: list, pad_token_id: int):
    """Stack several (PromptBatch, Rollout, RewardBreakdown) rounds into one, padding prompts and completions."""
    batches, rollouts, rewards = zip(*rounds)
    T = max(r.completion_ids.shape[1] for r in rollouts)

    def right(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)

    offsets = torch.cumsum(torch.tensor([0] + [b.input_ids.shape[0] for b in batches[:-1]]), 0).tolist()
    rollout = Rollout(
        prompt_index=torch.cat([r.prompt_index + o for r, o in zip(rollouts, offsets)]),
        completion_ids=torch.cat([right(r.completion_ids, pad_token_id) for r in rollouts]),
        completion_mask=torch.cat([right(r.completion_mask, 0) for r in rollouts]),
        logprobs=torch.cat([right(r.logprobs, 0.0) for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        texts=[t for r in rollouts for t in r.texts],
        group_size=rollouts[0].group_size,
    )
    cat = lambda ts: torch.cat(list(ts))  # noqa: E731
    reward = RewardBreakdown(cat(r.total for r in rewards),
                             {k: cat(r.components[k] for r in rewards) for k in rewards[0].components},
                             dict(rewards[0].weights), {k: cat(r.extras[k] for r in rewards) for k in rewards[0].extras})
    return concat_prompt_batches(batches, pad_token_id), rollout, reward


def dynamic_sampling(exp: Experiment, cfg: Config, stream: "PromptStream", first):
    """DAPO sec. 3.2: drop groups whose rewards are all equal and refill with fresh prompts, up to
    ``max_refill`` extra rounds. Returns the kept (batch, rollout, rewards), judge seconds and counts."""
    g = cfg.grpo
    kept, n_kept, filtered, refills, t_judge = [], 0, 0, 0, first[3]
    current = first[:3]
    while True:
        keep = dynamic_sampling_keep(current[2].total.view(-1, g.group_size))  # (B,)
        filtered += int((~keep).sum())
        if bool(keep.any()):
            kept.append(select_groups(*current, keep))
            n_kept += int(keep.sum())
        if n_kept >= g.prompts_per_step or refills >= g.max_refill:
            break
        refills += 1
        *current, dt = rollout_step(exp, cfg, stream)
        t_judge += dt
    stats = {"dapo/filtered_groups": filtered, "dapo/refill_rounds": refills, "dapo/kept_groups": n_kept}
    if not kept:
        return None, t_judge, stats
    batch, rollout, rewards = concat_rounds(kept, exp.processor.stop_token_ids[0]) if len(kept) > 1 else kept[0]
    if n_kept > g.prompts_per_step:  # keep exactly one rollout batch
        keep = torch.arange(n_kept) < g.prompts_per_step
        batch, rollout, rewards = select_groups(batch, rollout, rewards, keep)
    return (batch, rollout, rewards), t_judge, stats


# --------------------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> dict:
    """Run SFT (unless resuming past it), GRPO and evaluation as ``cfg`` says; returns the evaluation results."""
    cfg = cfg.resolved()
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    launched = dist.init(cfg.run.dist_timeout, cfg.run.dist_setup_timeout, cfg.model.device)  # torchrun: join the group
    W = dist.world_size()
    if cfg.grpo.prompts_per_step % W or cfg.grpo.mini_batch_prompts % W:
        raise ValueError(f"--grpo.prompts-per-step ({cfg.grpo.prompts_per_step}) and --grpo.mini-batch-prompts "
                         f"({cfg.grpo.mini_batch_prompts}) must be multiples of the number of processes ({W})")
    if W > 1 and cfg.algorithm().dynamic_sampling:
        raise NotImplementedError("DAPO dynamic sampling refills a varying number of groups per rank; it is not "
                                  "supported under torchrun yet: run it on one process")
    with dist.rank0_first("setup (data, model, Cold-Start SFT, baseline evaluation)"):  # rank 0 writes shared files
        exp = build_experiment(cfg, out)  # model (after SFT, or resumed), reference, processor, data, reward setup
    if dist.is_main():
        save_config(cfg, out / "config.toml")
    g, algo = cfg.grpo, exp.algo
    G = g.group_size
    # training handles: forward = teacher-forced log-probs; FSDP2-sharded or DDP-wrapped under torchrun
    policy = dist.wrap_policy(exp.model, cfg.run.parallel, exp.device, cfg.run.mixed_precision)
    reference = None if exp.reference is None else dist.wrap_reference(
        exp.reference, cfg.run.reference, cfg.run.parallel, exp.device, cfg.run.mixed_precision)
    judges = [policy, reference if cfg.reward.judge == "reference" else None]  # gathered whole while sampling
    if g.prompts_per_step % g.mini_batch_prompts:
        raise ValueError(f"--grpo.prompts-per-step ({g.prompts_per_step}) must be a multiple of --grpo.mini-batch-prompts ({g.mini_batch_prompts})")
    prompts_per_micro = max(1, g.micro_batch_rows // G)  # micro-batches hold whole groups, so images are shared
    updates_per_step = g.epochs * (g.prompts_per_step // g.mini_batch_prompts)

    params = [p for p in exp.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=g.lr, weight_decay=g.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(g.warmup_steps, g.steps, g.schedule))
    generator = torch.Generator(device=exp.device).manual_seed(cfg.run.seed)
    stream = PromptStream(len(exp.train_set), cfg.run.seed)
    start_step = 0
    if exp.resume_dir is not None:
        state = load_trainer_state(exp.resume_dir, optimizer, scheduler, generator, model=exp.model)
        start_step = state["step"]
        stream = PromptStream(len(exp.train_set), cfg.run.seed, **state["data"])
        dist.print0(f"[emor3] resumed from {exp.resume_dir} at step {start_step} (written by "
                    f"{state.get('world_size', 1)} process(es), now {W})")

    cfg_dict = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    sink = MetricsSink(out, cfg.run.logger, cfg_dict) if dist.is_main() else NullSink()
    stop = StopFlag()
    bar = tqdm(range(start_step, g.steps), initial=start_step, total=g.steps, desc="GRPO",
               disable=not (cfg.run.progress and dist.is_main()), dynamic_ncols=True)
    step = start_step
    for step in bar:
        t_step = time.perf_counter()
        exp.model.eval()
        m: dict[str, float] = {}

        # ---- rollout + rewards: sample G completions per prompt, score them (RER judges inside) -----------------
        t0 = time.perf_counter()
        def collect():
            first = rollout_step(exp, cfg, stream)
            return dynamic_sampling(exp, cfg, stream, first) if algo.dynamic_sampling else (first[:3], first[3], {})

        with torch.no_grad():  # FSDP: the sharded policy (and a judging reference) is gathered whole for sampling
            kept, t_judge, stats = dist.run_gathered(judges, collect)
            m.update(stats)
        if kept is None:  # every group was uninformative even after refilling: nothing to learn this step
            sink.log(step + 1, {**m, "skipped_updates": 1})
            continue
        batch, rollout, rewards = kept
        t_rollout = time.perf_counter() - t0 - t_judge
        B, N = batch.input_ids.shape[0], rollout.completion_ids.shape[0]
        T = int(rollout.completion_mask.sum(1).max().clamp(min=1))  # trim padding columns nobody uses
        completion_ids, mask = rollout.completion_ids[:, :T], rollout.completion_mask[:, :T]  # (N, T)
        sampler_logp = rollout.logprobs[:, :T]  # (N, T)

        # ---- advantages: group-relative, one per completion -------------------------------------------------------
        advantages = group_advantages(rewards.total.view(B, G), scale=algo.adv_scale).view(N)  # (N,)

        # ---- reference (and old) log-probs: frozen copy, eval mode, no grad, once per rollout batch ---------------
        t0 = time.perf_counter()
        micro = [torch.arange(s, min(s + prompts_per_micro, B)) for s in range(0, B, prompts_per_micro)]

        def rows_of(prompts: torch.Tensor) -> torch.Tensor:
            return (prompts[:, None] * G + torch.arange(G)).flatten()  # (len(prompts)·G,)

        def logprobs_of(handle, prompts, **kw):  # handle: a PolicyScorer (maybe FSDP/DDP): forward = log-probs
            sub = prompt_slice(batch, prompts)
            rows = rows_of(prompts)
            return handle(sub, torch.arange(len(prompts)).repeat_interleave(G).to(exp.device),
                          completion_ids[rows], mask[rows], temperature=g.temperature, **kw)

        ref_logp = old_logp = None
        with torch.no_grad():
            if algo.kl_coef > 0:
                ref_logp = torch.cat([logprobs_of(reference, p) for p in micro])  # (N, T)
            if updates_per_step > 1:
                old_logp = torch.cat([logprobs_of(policy, p) for p in micro])  # (N, T)
        t_reference = time.perf_counter() - t0

        # ---- update: μ epochs over mini-batches of whole groups, micro-batch accumulation, global normaliser ------
        t0 = time.perf_counter()
        exp.model.train()
        acc = {k: 0.0 for k in ("loss", "pg_loss", "kl", "entropy", "logp_gap", "clip_frac_low", "clip_frac_high",
                                "clip_frac_dual", "ratio_mean", "approx_kl_old")}
        ratio_min, ratio_max, n_micro, skipped, grad_norms = float("inf"), float("-inf"), 0, 0, []
        mini = g.mini_batch_prompts * B // g.prompts_per_step or B  # dynamic sampling may leave fewer prompts
        for epoch in range(g.epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.run.seed + step * 131 + epoch))
            for start in range(0, B, mini):
                mb_prompts = order[start : start + mini].sort().values
                mb_rows = rows_of(mb_prompts)
                # summed over ranks: each rank's loss is its share of the global mini-batch's loss
                normalizer = dist.all_reduce(loss_normalizer(mask[mb_rows], mode=algo.loss_agg, max_len=g.max_new_tokens))
                optimizer.zero_grad(set_to_none=True)
                for s in range(0, len(mb_prompts), prompts_per_micro):
                    p = mb_prompts[s : s + prompts_per_micro]
                    rows = rows_of(p)
                    last = s + prompts_per_micro >= len(mb_prompts)  # reduce gradients over ranks once, at the end
                    with dist.grad_sync(policy, last):
                        logp, entropy = logprobs_of(policy, p, return_entropy=True)  # (n, T) each
                    old = old_logp[rows] if old_logp is not None else logp.detach()
                    per_token, pm = policy_loss(logp, old, advantages[rows].to(logp.device), mask[rows],
                                                clip_low=algo.clip_low, clip_high=algo.clip_high,
                                                dual_clip=algo.dual_clip, level=algo.ratio_level)
                    pg_loss = aggregate(per_token, mask[rows], mode=algo.loss_agg, normalizer=normalizer)
                    loss = pg_loss
                    if ref_logp is not None:
                        kl = kl_penalty(logp, ref_logp[rows], kind=algo.kl_kind)  # (n, T)
                        loss = loss + algo.kl_coef * aggregate(kl, mask[rows], mode=algo.loss_agg, normalizer=normalizer)
                        acc["kl"] += _masked_mean(kl.detach(), mask[rows])
                    with dist.grad_sync(policy, last):  # FSDP/DDP average over W ranks: scale by W to sum
                        (loss * dist.loss_scale()).backward()
                    n_micro += 1
                    acc["loss"] += float(loss.detach())
                    acc["pg_loss"] += float(pg_loss.detach())
                    acc["entropy"] += _masked_mean(entropy.detach(), mask[rows])
                    acc["logp_gap"] += _masked_mean((logp.detach() - sampler_logp[rows]).abs(), mask[rows])
                    for k in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean", "approx_kl_old"):
                        acc[k] += float(pm[k])
                    ratio_min, ratio_max = min(ratio_min, float(pm["ratio_min"])), max(ratio_max, float(pm["ratio_max"]))
                grad_norm = dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, g.grad_clip))  # global norm
                if torch.isfinite(grad_norm):
                    optimizer.step()
                else:  # a non-finite gradient would poison AdamW's moments: skip the step and say so
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                grad_norms.append(float(grad_norm))
        scheduler.step()
        t_update = time.perf_counter() - t0

        # ---- record -------------------------------------------------------------------------------------------------
        dt = time.perf_counter() - t_step
        # over the global batch: sums and counts over ranks, rows gathered in global prompt order
        acc = dist.reduce_metrics({**acc, "n_micro": n_micro})
        n_micro = acc.pop("n_micro")
        ratio_min, ratio_max = dist.all_reduce(ratio_min, "min"), dist.all_reduce(ratio_max, "max")
        rewards, advantages = gather_rewards(rewards), dist.gather_rows(advantages)
        truncated = dist.gather_rows(rollout.truncated)
        m.update({k: v / max(1, n_micro) for k, v in acc.items()})
        m.update(rewards.metrics(prefix="reward/"))
        lengths = dist.gather_rows(rollout.lengths).float()
        zero_std = (~dynamic_sampling_keep(rewards.total.view(-1, G))).float().mean()
        m.update({
            "ratio_min": ratio_min, "ratio_max": ratio_max, "grad_norm": sum(grad_norms) / len(grad_norms),
            "skipped_updates": skipped, "lr": scheduler.get_last_lr()[0],
            "accuracy": float(rewards.components["accuracy"].nanmean()),
            "format_rate": float(rewards.components["format"].nanmean()),
            "advantage_abs_mean": float(advantages.abs().mean()), "zero_std_group_frac": float(zero_std),
            "truncation_rate": float(truncated.float().mean()),
            "completion_len_mean": float(lengths.mean()), "completion_len_max": float(lengths.max()),
            "time/rollout": t_rollout, "time/judge": t_judge, "time/reference": t_reference, "time/update": t_update,
            "time/step": dt, "tokens_per_s": float(lengths.sum()) / max(dt, 1e-9),
            "peak_memory_mb": dist.all_reduce(peak_memory_mb(exp.device), "max"),
        })
        sink.log(step + 1, m)
        bar.set_postfix(reward=f"{m['reward/total']:.3f}", acc=f"{m['accuracy']:.2f}", s=f"{dt:.1f}")
        if cfg.run.sample_every and (step + 1) % cfg.run.sample_every == 0:
            sink.log_samples(step + 1, [
                {"prompt": int(rollout.prompt_index[i]), "completion": rollout.texts[i],
                 **{k: float(v[i]) for k, v in rewards.components.items()}, "total": float(rewards.total[i])}
                for i in range(min(N, 2 * G))
            ])
        done = step + 1 == g.steps
        if dist.any_rank(stop.signal is not None) and stop.signal is None:  # another rank got the signal: stop together
            stop.signal = signal.SIGTERM
        if stop.signal is not None or done or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
            save_checkpoint(exp, out, step + 1, optimizer, scheduler, generator, stream.state())
        if stop.signal is not None:
            break
    bar.close()
    stop.restore()
    sink.close()
    if stop.signal is not None:
        dist.print0(f"[emor3] stopped at step {step + 1}; resume with --resume {out}")
        if launched:
            dist.shutdown()
        return {"stopped_at": step + 1}

    # ---- evaluation: the paper-style table (rank 0 alone, on the whole model) -------------------------------------
    from emor3.evaluate import evaluate_experiment

    if launched:
        main_rank = dist.is_main()
        dist.barrier("end of training")
        dist.shutdown()  # evaluation below issues no collectives; the other ranks are done
        if not main_rank:
            return {}
        if cfg.run.parallel == "fsdp" and (out / "checkpoint" / "model").is_dir():  # the final checkpoint, unsharded
            from emor3.models import load_pretrained

            exp.model = load_pretrained(out / "checkpoint" / "model", dtype=getattr(torch, cfg.model.dtype),
                                        device=exp.device)
    return evaluate_experiment(exp, cfg, out)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, "python -m emor3.grpo.train", DESCRIPTION)
    with dist.guard("the GRPO run"):  # a failed collective (a crashed rank) ends with an error that says so
        train(cfg)


if __name__ == "__main__":
    main()
