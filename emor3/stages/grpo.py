"""The GRPO stage: the loop around ``emor3.grpo.step.grpo_step``, with its optimizer, logging and checkpoints.

``grpo`` sets up the policy GRPO trains (LoRA adapters, the frozen reference, the FSDP / DDP handles), the optimizer
and the prompt stream (a resumed run's from its checkpoint), then runs one ``grpo_step`` per step, logs it
(``MetricsSink``: metrics.jsonl, samples.jsonl, TensorBoard or W&B) and checkpoints (``emor3.checkpoints``). SIGINT
or SIGTERM stops it after the current step, checkpointed. The method it follows is docs/method.md's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from emor3 import distributed as dist
from emor3.checkpoints import latest_checkpoint, load_policy, load_trainer_state, save_checkpoint
from emor3.config import Config
from emor3.folders import RunFolderError
from emor3.grpo.rollout import PromptStream, RolloutSetup
from emor3.grpo.step import grpo_step
from emor3.memory import RunPlan, estimate, largest_sample_chunk, plan_from_config, run_table
from emor3.models.checkpoint import read_config
from emor3.models.lora import AdaptersOff, has_lora
from emor3.models.sizes import tiny_config
from emor3.run_folder import record_lineage, record_resume_changes, start_dir
from emor3.stages.build import Run, reference_model, resolve_device, with_adapters
from emor3.stages.resume import ResumePoint


# --------------------------------------------------------------------------------------------- logging sinks


def rollback_jsonl(path: Path, step: int) -> None:
    """Keep the records of ``path`` up to ``step`` (a resumed run writes the later ones again) and drop a partial
    last line (a crash in the middle of a write), so the next record starts on a line of its own. Rewritten through
    a temporary file and a rename."""
    if not path.is_file():
        return
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")  # tail: the bytes after the last newline, b"" unless a write was cut short
    kept, later, damaged = [], 0, int(bool(tail.strip()))
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            damaged += bool(line.strip())
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            later += 1
        else:
            kept.append(line)
    if later or damaged:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        tmp.replace(path)
        print(f"[emor3] {path}: rolled back to step {step} (dropped {later} later record(s)"
              + (f" and {damaged} partial line(s) a crash cut short" if damaged else "") + ")")


class MetricsSink:
    """metrics.jsonl (one JSON object per step) and samples.jsonl, plus TensorBoard or W&B when asked for and
    installed. ``NullSink`` has the same methods and writes nothing, so the loop never asks whether to log.
    ``resume_step``: a resumed run's checkpoint step; both files are rolled back to it (``rollback_jsonl``) and
    appended to. A new run starts them empty."""

    def __init__(self, out: Path, logger: str = "jsonl", config: dict | None = None, resume_step: int | None = None):
        if resume_step is not None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                rollback_jsonl(out / name, resume_step)
        mode = "w" if resume_step is None else "a"
        self.metrics = open(out / "metrics.jsonl", mode)
        self.samples = open(out / "samples.jsonl", mode)
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


# --------------------------------------------------------------------------------------------- settings


def model_config(cfg: Config):
    """The architecture of the run's model, from the config alone: ``--model.path``'s config.json, else the named
    size ``--model.tiny`` at ``--model.tokenizer-vocab``."""
    m = cfg.model
    return read_config(m.path) if m.path else tiny_config(m.tiny, vocab_size=m.tokenizer_vocab)


def check_world(cfg: Config, world: int) -> None:
    """Settings the number of processes must divide or allow."""
    g = cfg.grpo
    if g.prompts_per_step % world or g.mini_batch_prompts % world:
        raise ValueError(f"--grpo.prompts-per-step ({g.prompts_per_step}) and --grpo.mini-batch-prompts "
                         f"({g.mini_batch_prompts}) must be multiples of the number of processes ({world})")
    if world > 1 and cfg.algorithm().dynamic_sampling:
        raise NotImplementedError("DAPO dynamic sampling refills a varying number of groups per rank; it is not "
                                  "supported under torchrun yet: run it on one process")


def resolve_sample_chunk(cfg: Config, world: int) -> Config:
    """``cfg`` with ``--grpo.sample-chunk 0`` resolved on CUDA: the largest chunk of this rank's prompts whose
    rollout (KV cache and the gathered weights included, ``emor3.memory``) fits in 90 % of what this process can use
    (free memory plus what it already holds), the same on every rank. Elsewhere 0 stays: a rank's whole share."""
    device = resolve_device(cfg.model.device)
    if cfg.grpo.sample_chunk or device.type != "cuda":
        return cfg
    arch = model_config(cfg)
    plan: RunPlan = plan_from_config(cfg, arch, world)
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(0.9 * (free + torch.cuda.memory_reserved(device)))
    chunk = int(dist.all_reduce(float(largest_sample_chunk(arch, plan, budget)), "min"))
    peak = estimate(arch, dataclasses.replace(plan, sample_chunk=chunk)).rollout_peak
    dist.print0(f"[emor3] --grpo.sample-chunk 0: sampling {chunk} of {plan.prompts_per_rank} prompts at a time "
                f"(planned rollout peak {peak / 2**30:.1f} GiB of {budget / 2**30:.1f} GiB usable)")
    return dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, sample_chunk=chunk))


# --------------------------------------------------------------------------------------------- the stage


def rollout_setup(cfg: Config, run: Run, model: torch.nn.Module, ref_model: torch.nn.Module | None) -> RolloutSetup:
    """What ``grpo_step``'s rollout reads: ``model`` samples, and judges unless ``--reward.judge reference`` (then
    ``ref_model``)."""
    return RolloutSetup(model, ref_model if cfg.reward.judge == "reference" else model, run.processor,
                        run.train_set, run.taxonomies, run.reward_weights, run.plugins, run.device)


@dataclass(frozen=True)
class GrpoResult:
    model: torch.nn.Module | None  # the trained policy, whole (None on the ranks other than 0 under torchrun)
    stopped_at: int | None  # the step a signal stopped the run at, else None


def training_handles(cfg: Config, model: torch.nn.Module, ref_model: torch.nn.Module | None, device: torch.device):
    """(policy, reference): the scoring handles ``grpo_step`` takes (forward = teacher-forced log-probs; FSDP2-sharded
    or DDP-wrapped under torchrun). With LoRA and no reference model, the reference is the policy, adapters off."""
    policy = dist.wrap_policy(model, cfg.run.parallel, device, cfg.run.mixed_precision)
    reference = None if ref_model is None else dist.wrap_reference(
        ref_model, cfg.run.reference, cfg.run.parallel, device, cfg.run.mixed_precision)
    if has_lora(model) and cfg.algorithm().kl_coef > 0 and reference is None:
        reference = AdaptersOff(policy, model)
    return policy, reference


def optimizer_for(cfg: Config, model: torch.nn.Module):
    """(AdamW over the trained parameters, its learning-rate schedule) at the run's GRPO settings."""
    g = cfg.grpo
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=g.lr,
                                  weight_decay=g.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(g.warmup_steps, g.steps, g.schedule))


def grpo(cfg: Config, run: Run, model: torch.nn.Module, out: Path, point: ResumePoint | None,
         launched: bool) -> GrpoResult:
    """GRPO from ``model`` (the policy after Cold-Start SFT, or the resumed ``point``'s) for ``--grpo.steps``
    steps (module docstring). ``launched``: this process joined a torchrun group, which ends here."""
    g, W = cfg.grpo, dist.world_size()
    resumed = point is not None
    start = start_dir(out, run.source_dir)
    model = with_adapters(model, cfg)  # LoRA: fresh adapters on the model GRPO starts from (a resumed run has its own)
    ref_model = reference_model(cfg, model, run.source_dir, start, resumed, run.device)  # none with LoRA
    policy, reference = training_handles(cfg, model, ref_model, run.device)
    dist.print0(run_table(cfg, model.config, W))
    lineage = point.lineage if resumed else record_lineage(cfg, out, start)  # a resume checks it
    setup = rollout_setup(cfg, run, model, ref_model)
    optimizer, scheduler = optimizer_for(cfg, model)
    stream = PromptStream(len(run.train_set), cfg.run.seed)
    start_step = 0
    if resumed:
        state = load_trainer_state(point.state, optimizer, scheduler, model=model)
        start_step = state["step"]
        if g.steps < start_step:
            raise RunFolderError(f"--resume {out}: --grpo.steps {g.steps} is before the checkpoint's step "
                                 f"{start_step}: python -m emor3.grpo.train --resume {out} --grpo.steps {start_step} "
                                 "(or more)")
        if dist.is_main():
            record_resume_changes(cfg, out, start_step)
        stream = PromptStream(len(run.train_set), cfg.run.seed, **state["data"])
        dist.print0(f"[emor3] resumed from {point.checkpoint} at step {start_step} (written by "
                    f"{state.get('world_size', 1)} process(es), now {W})")

    # ---- the loop: one grpo_step each, then log and checkpoint ------------------------------------------------
    cfg_dict = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    sink = MetricsSink(out, cfg.run.logger, cfg_dict, start_step if resumed else None) if dist.is_main() \
        else NullSink()
    stop = StopFlag()
    bar = tqdm(range(start_step, g.steps), initial=start_step, total=g.steps, desc="GRPO",
               disable=not (cfg.run.progress and dist.is_main()), dynamic_ncols=True)
    step = start_step
    try:  # the handlers go back and the log closes however the loop ends (a failed save too)
        for step in bar:
            m, samples = grpo_step(cfg, setup, stream, policy, reference, optimizer, scheduler, step)
            sink.log(step + 1, m)
            if "reward/total" in m:
                bar.set_postfix(reward=f"{m['reward/total']:.3f}", acc=f"{m['accuracy']:.2f}",
                                s=f"{m['time/step']:.1f}")
            done = step + 1 == g.steps
            if cfg.run.sample_every and ((step + 1) % cfg.run.sample_every == 0 or done) and samples:  # last too
                sink.log_samples(step + 1, samples)
            if dist.any_rank(stop.signal is not None) and stop.signal is None:  # another rank's signal: stop too
                stop.signal = signal.SIGTERM
            if stop.signal is not None or done or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                save_checkpoint(model, out, step + 1, optimizer, scheduler, stream.state(),
                                keep=cfg.run.keep_checkpoints, tokenizer_dir=run.source_dir, base=start,
                                base_sha256=lineage["start_model"]["sha256"] if lineage else None)
            if stop.signal is not None:
                break
    finally:
        bar.close()
        stop.restore()
        sink.close()
    if stop.signal is not None:
        dist.print0(f"[emor3] stopped at step {step + 1}; resume with --resume {out}")
        if launched:
            dist.shutdown()
        return GrpoResult(model if dist.is_main() else None, step + 1)
    if launched:  # evaluation issues no collectives: rank 0 goes on alone, on the whole model
        main_rank = dist.is_main()
        dist.barrier("end of training")
        dist.shutdown()
        if not main_rank:
            return GrpoResult(None, None)
        final = latest_checkpoint(out)
        if cfg.run.parallel == "fsdp" and final is not None:  # the final checkpoint, unsharded
            model = load_policy(cfg, final, start, run.device)
    return GrpoResult(model, None)
