"""One GRPO step, top to bottom: collect -> advantages -> reference log-probs -> update -> metrics.

``grpo_step`` is the whole step over one resolved config and the objects it reads (``RolloutSetup``, the scoring
handles, the optimizer); ``emor3.stages.grpo`` runs it in a loop. What each phase does and why is docs/method.md's
"One GRPO step"; the math is ``emor3.grpo.objective``'s.

Shape legend: B prompts, G samples per prompt, N = B·G rows, n rows of a micro-batch, T completion length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from emor3 import distributed as dist
from emor3.config import Algorithm, Config
from emor3.engine.sampler import group_rows
from emor3.engine.scoring import prompt_slice
from emor3.grpo.objective import aggregate, dynamic_sampling_keep, group_advantages, kl_penalty, loss_normalizer, policy_loss
from emor3.grpo.rollout import PromptStream, RolloutSetup, ScoredBatch, collect, stream_seed


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)  # () on x's device


@dataclass
class UpdateMetrics:
    """The update's metrics, accumulated on the device as float64 scalars in micro-batch order, so the step reads
    them on the host once per step (``to_floats``) instead of once per micro-batch. ``loss``, ``pg_loss``: sums of the
    micro-batches' shares of their mini-batch loss; ``kl`` ... ``approx_kl_old``: sums of per-micro-batch means;
    ``ratio_min`` / ``ratio_max``: extremes over micro-batches; ``grad_norm``: sum over updates."""

    loss: torch.Tensor
    pg_loss: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    logp_gap: torch.Tensor
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    clip_frac_dual: torch.Tensor
    ratio_mean: torch.Tensor
    approx_kl_old: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    grad_norm: torch.Tensor

    SUMMED = ("loss", "pg_loss", "kl", "entropy", "logp_gap", "clip_frac_low", "clip_frac_high", "clip_frac_dual",
              "ratio_mean", "approx_kl_old")

    @classmethod
    def zeros(cls, device: torch.device) -> "UpdateMetrics":
        z = lambda v: torch.tensor(v, dtype=torch.float64, device=device)  # noqa: E731
        return cls(**{k: z(0.0) for k in cls.SUMMED}, ratio_min=z(float("inf")), ratio_max=z(float("-inf")),
                   grad_norm=z(0.0))

    def add_micro(self, loss, pg_loss, kl, entropy, logp_gap, pm: dict) -> None:
        """One micro-batch's scalars (0-dim tensors; ``kl`` None without a KL term)."""
        new = {"loss": loss, "pg_loss": pg_loss, "kl": kl, "entropy": entropy, "logp_gap": logp_gap,
               **{k: pm[k] for k in self.SUMMED[5:]}}
        for k, v in new.items():
            if v is not None:
                setattr(self, k, getattr(self, k) + v.detach().to(torch.float64))
        self.ratio_min = torch.minimum(self.ratio_min, pm["ratio_min"].detach().to(torch.float64))
        self.ratio_max = torch.maximum(self.ratio_max, pm["ratio_max"].detach().to(torch.float64))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def to_floats(named: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors as floats, in one device-to-host copy per device they live on (float64: exact for float32)."""
    by_device: dict[torch.device, list[str]] = {}
    for k, v in named.items():
        by_device.setdefault(v.device, []).append(k)
    out = {}
    for keys in by_device.values():
        out.update(zip(keys, torch.stack([named[k].detach().to(torch.float64) for k in keys]).tolist()))
    return {k: out[k] for k in named}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # pragma: no cover
        return float("nan")


def micro_batches(prompts: torch.Tensor, group_size: int, micro_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompts, rows) of each micro-batch over the groups of ``prompts``: with ``micro_rows`` >= G, micro_rows // G
    whole groups each (a prompt's image encoded once for its G rows); below G (a divisor of G, checked by the
    config), G / micro_rows consecutive slices of each group, as the release's 4 rows per GPU at G = 8."""
    G = group_size
    if micro_rows >= G:
        return [(p, group_rows(p, G)) for p in prompts.split(micro_rows // G)]
    assert G % micro_rows == 0, f"--grpo.micro-batch-rows {micro_rows} must divide G = {G}"
    return [(p[None], p * G + torch.arange(s, s + micro_rows, device=prompts.device))  # (micro_rows,) rows
            for p in prompts for s in range(0, G, micro_rows)]


def micro_logprobs(handle, batch: ScoredBatch, prompts: torch.Tensor, rows: torch.Tensor, completion_ids: torch.Tensor,
                   mask: torch.Tensor, temperature: float, **kw):
    """Teacher-forced log-probs (n, T) (and entropy with ``return_entropy=True``) of completion ``rows`` (n,), all
    of them samples of ``prompts``, under ``handle`` (a PolicyScorer, maybe FSDP/DDP: forward = log-probs); each
    prompt's image is encoded once for its rows."""
    owner = rows.div(batch.group_size, rounding_mode="floor")  # (n,) the prompt each row samples
    prompt_index = (owner[:, None] == prompts[None, :].to(owner.device)).int().argmax(1)  # (n,) position in prompts
    return handle(prompt_slice(batch.prompts, prompts), prompt_index.to(completion_ids.device), completion_ids[rows],
                  mask[rows], temperature=temperature, **kw)


def micro_batch_loss(logp, old_logp, ref_logp, advantages, mask, algo: Algorithm, normalizer):
    """A micro-batch's share of its mini-batch's loss: the clipped surrogate (+ β·KL), each aggregated with the
    mini-batch's global ``normalizer``, so the shares of all micro-batches and ranks add up to the mini-batch loss.
    -> (loss, pg_loss, per-token KL (n, T) or None, the surrogate's metrics)."""
    per_token, pm = policy_loss(logp, old_logp, advantages.to(logp.device), mask, clip_low=algo.clip_low,
                                clip_high=algo.clip_high, dual_clip=algo.dual_clip, level=algo.ratio_level)
    pg_loss = aggregate(per_token, mask, mode=algo.loss_agg, normalizer=normalizer)
    if ref_logp is None:
        return pg_loss, pg_loss, None, pm
    kl = kl_penalty(logp, ref_logp, kind=algo.kl_kind)  # (n, T)
    return pg_loss + algo.kl_coef * aggregate(kl, mask, mode=algo.loss_agg, normalizer=normalizer), pg_loss, kl, pm


def micro_normalizer(mask: torch.Tensor, mode: str, max_len: int, n_micro: int) -> torch.Tensor:
    """The release's normaliser (``--grpo.loss-scope micro-batch``): the micro-batch's own count (tokens for
    token-mean) times the ``n_micro`` micro-batches of this rank's mini-batch times the world size, so the loss is
    the mean over micro-batches and ranks of each micro-batch's own aggregate, as verl's gradient accumulation
    (loss / accumulation steps, gradients averaged over ranks). It weighs a token of a short micro-batch more than
    one of a long micro-batch; the default "mini-batch" scope (one count over the whole mini-batch) does not."""
    return loss_normalizer(mask, mode=mode, max_len=max_len) * n_micro * dist.world_size()


def grpo_step(cfg: Config, setup: RolloutSetup, stream: PromptStream, policy, reference, optimizer, scheduler,
              step: int) -> tuple[dict, list[dict]]:
    """One GRPO step: collect -> advantages -> reference log-probs -> update -> metrics.

    ``setup``: the models, prompts and reward setup the rollout reads; ``policy`` / ``reference``: the scoring
    handles (``dist.wrap_policy`` / ``dist.wrap_reference``; reference None when β = 0 and the policy judges).
    Returns the step's metrics (over the global batch) and a few sample rows."""
    assert cfg.resolved() == cfg, "grpo_step: the config must be resolved (Config.resolved: no 'auto' left)"
    g, algo, G = cfg.grpo, cfg.algorithm(), cfg.grpo.group_size
    t_step = time.perf_counter()
    setup.model.eval()

    # ---- collect: G completions per prompt, scored (RER judges inside); FSDP gathers the shards for sampling ----
    judges = [policy, reference if cfg.reward.judge == "reference" else None]
    with torch.no_grad():
        batch, t_judge, m = dist.run_gathered(judges, collect, setup, cfg, stream)
    if batch is None:  # every group was uninformative even after refilling: nothing to learn this step
        scheduler.step()
        return {**m, "skipped_updates": 1}, []
    t_rollout = time.perf_counter() - t_step - t_judge
    rollout, B = batch.rollout, batch.num_prompts
    N = rollout.completion_ids.shape[0]
    T = int(rollout.completion_mask.sum(1).max().clamp(min=1))  # trim padding columns nobody uses
    completion_ids, mask = rollout.completion_ids[:, :T], rollout.completion_mask[:, :T]  # (N, T)

    # ---- advantages: group-relative, one per completion --------------------------------------------------------
    batch.advantages = group_advantages(batch.rewards.total.view(B, G), scale=algo.adv_scale).view(N)  # (N,)

    # ---- reference (and old) log-probs: frozen copy, no grad, once per rollout batch --------------------------
    t0 = time.perf_counter()
    micro = micro_batches(torch.arange(B), G, g.micro_batch_rows)  # in row order: their log-probs concatenate to (N, T)
    ref_logp = old_logp = None
    with torch.no_grad():
        if algo.kl_coef > 0:
            ref_logp = torch.cat([micro_logprobs(reference, batch, p, rows, completion_ids, mask, g.temperature,
                                                    shared_prefix=g.shared_prefix) for p, rows in micro])
        if g.epochs * (g.prompts_per_step // g.mini_batch_prompts) > 1:  # several updates: the policy moves
            old_logp = torch.cat([micro_logprobs(policy, batch, p, rows, completion_ids, mask, g.temperature,
                                                    shared_prefix=g.shared_prefix) for p, rows in micro])
    t_reference = time.perf_counter() - t0

    # ---- update: μ epochs over mini-batches of whole groups, micro-batch accumulation, global normaliser ------
    t0 = time.perf_counter()
    setup.model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    um = UpdateMetrics.zeros(mask.device)
    n_micro, n_updates, skipped = 0, 0, 0
    mini = g.mini_batch_prompts * B // g.prompts_per_step or B  # dynamic sampling may leave fewer prompts
    for epoch in range(g.epochs):
        order = torch.randperm(B, generator=torch.Generator().manual_seed(
            stream_seed(cfg.run.seed, "update_order", 131 * step + epoch)))
        for start in range(0, B, mini):
            mb_prompts = order[start : start + mini].sort().values
            # summed over ranks: each rank's loss is its share of the global mini-batch's loss
            normalizer = dist.all_reduce(loss_normalizer(mask[group_rows(mb_prompts, G)], mode=algo.loss_agg,
                                                         max_len=g.max_new_tokens))
            mb_micro = micro_batches(mb_prompts, G, g.micro_batch_rows)  # this rank's micro-batches of the mini-batch
            optimizer.zero_grad(set_to_none=True)
            for j, (p, rows) in enumerate(mb_micro):
                if g.loss_scope == "micro-batch":
                    normalizer = micro_normalizer(mask[rows], algo.loss_agg, g.max_new_tokens, len(mb_micro))
                last = j + 1 == len(mb_micro)  # reduce gradients over ranks once, at the end
                with dist.grad_sync(policy, last):
                    logp, entropy = micro_logprobs(policy, batch, p, rows, completion_ids, mask, g.temperature,
                                                   return_entropy=True, shared_prefix=g.shared_prefix)  # (n, T) each
                old = old_logp[rows] if old_logp is not None else logp.detach()
                loss, pg_loss, kl, pm = micro_batch_loss(logp, old, None if ref_logp is None else ref_logp[rows],
                                                         batch.advantages[rows], mask[rows], algo, normalizer)
                with dist.grad_sync(policy, last):  # FSDP/DDP average over W ranks: scale by W to sum
                    (loss * dist.loss_scale()).backward()
                n_micro += 1
                um.add_micro(loss, pg_loss,  # shares of the mini-batch loss: summed, not averaged
                             None if kl is None else _masked_mean(kl.detach(), mask[rows]),
                             _masked_mean(entropy.detach(), mask[rows]),
                             _masked_mean((logp.detach() - rollout.logprobs[rows, :T]).abs(), mask[rows]), pm)
            grad_norm = dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, g.grad_clip))  # global norm
            um.grad_norm = um.grad_norm + grad_norm.detach().to(torch.float64)
            if torch.isfinite(grad_norm):  # the one host sync of an update: whether AdamW may step
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollout
            else:  # a non-finite gradient would poison AdamW's moments: skip the step and say so
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
            n_updates += 1
    scheduler.step()
    t_update = time.perf_counter() - t0

    # ---- metrics: over the global batch (sums and counts over ranks, rows gathered in global prompt order) -----
    dt = time.perf_counter() - t_step
    rewards, advantages = batch.gathered_rewards(), dist.gather_rows(batch.advantages)
    lengths = dist.gather_rows(rollout.lengths).float()  # (N_global,)
    rollout_stats = {
        "accuracy": rewards.components["accuracy"].nanmean(),
        "format_rate": rewards.components["format"].nanmean(),
        "advantage_abs_mean": advantages.abs().mean(),
        "zero_std_group_frac": (~dynamic_sampling_keep(rewards.total.view(-1, G))).float().mean(),
        "truncation_rate": dist.gather_rows(rollout.truncated).float().mean(),
        "completion_len_mean": lengths.mean(), "completion_len_max": lengths.max(), "tokens": lengths.sum(),
    }
    local = to_floats({**um.tensors(), **rollout_stats})  # the step's metrics read on the host once
    acc = dist.reduce_metrics({**{k: local[k] for k in UpdateMetrics.SUMMED}, "n_micro": n_micro})
    n_micro = acc.pop("n_micro")
    # loss, pg_loss: the mini-batch loss (the sum of its shares over micro-batches and ranks), mean over updates;
    # the rest: means over micro-batches
    m.update({k: v / max(1, n_updates if k in ("loss", "pg_loss") else n_micro) for k, v in acc.items()})
    m.update(rewards.metrics(prefix="reward/"))
    m.update({
        "ratio_min": dist.all_reduce(local["ratio_min"], "min"),
        "ratio_max": dist.all_reduce(local["ratio_max"], "max"),
        "grad_norm": local["grad_norm"] / n_updates, "skipped_updates": skipped, "lr": scheduler.get_last_lr()[0],
        **{k: local[k] for k in rollout_stats if k != "tokens"},
        "time/rollout": t_rollout, "time/judge": t_judge, "time/reference": t_reference, "time/update": t_update,
        "time/step": dt, "tokens_per_s": local["tokens"] / max(dt, 1e-9),
        "peak_memory_mb": dist.all_reduce(peak_memory_mb(setup.device), "max"),
    })
    samples = [{"prompt": int(rollout.prompt_index[i]), **(batch.records[i] if batch.records else {}),
                "completion": rollout.texts[i], **{k: float(v[i]) for k, v in rewards.components.items()},
                "total": float(rewards.total[i])}
               for i in range(min(N, 2 * G))]
    return m, samples
