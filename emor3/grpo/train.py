"""python -m emor3.grpo.train: the whole EMO-R3 run. Cold-Start SFT, GRPO with SET and RER, evaluation.

With no arguments it runs the embedded default on a CPU in minutes: a tiny Qwen2.5-VL-architecture model with a
tokenizer trained offline, the synthetic EmoScenes benchmark, Cold-Start SFT on ~100 SET traces, GRPO with the
``emo_r3`` preset, then the paper-style accuracy table. ``--model PATH`` starts from a Qwen2-VL / Qwen2.5-VL /
Qwen3-VL checkpoint folder instead, ``--data`` / ``--eval-data`` take datasets in the loaders' formats,
``--config FILE`` a TOML recipe (examples/). Every flag: ``--help``.

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
4. KL to the frozen reference (the model after Cold-Start SFT; ``--grpo.reference init``: the model before it,
   the release's anchor) is in the loss, k3 with β = 0.01 (the paper); β = 0 (DAPO, Dr.GRPO, GSPO) never builds
   the reference model. With LoRA (``--model.lora-rank``) only adapters train and the reference is the policy with
   its adapters switched off: no second copy of the weights (``init`` keeps one: the pre-SFT model).
5. Loss: clipped surrogate with clip 0.2 / 0.3 and dual clip 3 (the paper), token-mean over the mini-batch. The
   denominator is computed once per mini-batch (``objective.loss_normalizer``), so gradient accumulation over
   micro-batches gives exactly the mini-batch gradient (``--grpo.loss-scope mini-batch``, the tiny default's);
   a checkpoint run follows the release, a token-mean per micro-batch averaged over micro-batches
   (``micro-batch``; docs/method.md, "Where the paper is silent").
6. Old log-probs: with one update per rollout batch (the paper's default: μ = 1 and one mini-batch) the policy
   has not moved since sampling, so old = current, detached, and the ratio is exactly 1 (the loss then is the
   policy-gradient surrogate). With several updates per batch the trainer recomputes old log-probs before the first
   update, as verl does; the sampler's own log-probs are only compared (metric ``logp_gap``), never trusted.
7. A prompt's image is encoded once per micro-batch and shared by its G rows (its rows in the micro-batch when
   ``--grpo.micro-batch-rows`` is below G and splits the group, as the release's 4 rows at G = 8), and
   (``--grpo.shared-prefix``, on by default) the prompt itself runs through the decoder once: the completions
   attend to its keys and values (``emor3.models.shared_prefix``; exact, the same log-probs and gradients up to
   float rounding). The vision tower is trained (the paper) unless ``--model.freeze-vision``.
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

12. The logged ``loss`` and ``pg_loss`` are the mini-batch loss, averaged over the step's updates: the same for any
   ``--grpo.micro-batch-rows`` and any number of processes.

The step itself is ``emor3.grpo.step.grpo_step`` (collect -> advantages -> reference log-probs -> update ->
metrics); this file is the run around it: ``train`` builds the run (``emor3.experiment``), runs Cold-Start SFT
(``emor3.sft``) and the baseline evaluation, loops over steps with logging and checkpoints, and evaluates the
trained policy (``emor3.evaluate``).

Shape legend: B prompts, G samples per prompt, N = B·G rows, T completion length, P prompt length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import torch
from tqdm import tqdm

from emor3 import distributed as dist
from emor3.config import Config, parse_args, save_config, validate_config
from emor3.evaluate import evaluate_baseline, evaluate_experiment
from emor3.experiment import (attach_adapters, attach_reference, build_experiment, latest_checkpoint, load_policy,
                              load_trainer_state, prepare_run_dir, record_lineage, record_resume_changes,
                              save_checkpoint, set_threads, start_dir)
from emor3.folders import RunFolderError, run_cli, unlock_folder, wants_debug
from emor3.grpo.rollout import PromptStream
from emor3.grpo.step import grpo_step
from emor3.memory import RunPlan, fits_verdict, largest_sample_chunk, plan_from_config, run_table
from emor3.memory import estimate as estimate_memory
from emor3.models import tiny_config
from emor3.models.checkpoint import read_config
from emor3.models.lora import AdaptersOff, has_lora
from emor3.sft import cold_start

DESCRIPTION = (__doc__ or "").split("\n\n")[0] + "\n\n" + (__doc__ or "").split("\n\n")[1]


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


# --------------------------------------------------------------------------------------------- the run


def auto_sample_chunk(cfg: Config, exp, world: int) -> int:
    """``--grpo.sample-chunk 0`` on CUDA: the largest chunk of this rank's prompts whose rollout (KV cache and the
    gathered weights included, ``emor3.memory``) fits in 90 % of what this process can use (free memory plus what
    it already holds), the same on every rank."""
    plan: RunPlan = plan_from_config(cfg, exp.model.config, world)
    free, _ = torch.cuda.mem_get_info(exp.device)
    budget = int(0.9 * (free + torch.cuda.memory_reserved(exp.device)))
    chunk = int(dist.all_reduce(float(largest_sample_chunk(exp.model.config, plan, budget)), "min"))
    peak = estimate_memory(exp.model.config, dataclasses.replace(plan, sample_chunk=chunk)).rollout_peak
    dist.print0(f"[emor3] --grpo.sample-chunk 0: sampling {chunk} of {plan.prompts_per_rank} prompts at a time "
                f"(planned rollout peak {peak / 2**30:.1f} GiB of {budget / 2**30:.1f} GiB usable)")
    return chunk


def train(cfg: Config) -> dict:
    """The whole run: build -> Cold-Start SFT (unless resuming past it) -> baseline evaluation -> GRPO steps ->
    evaluation of the trained policy; returns the evaluation table's rows."""
    cfg = validate_config(cfg).resolved()
    if cfg.run.dry_run:  # the memory plan from the config alone: no weights, data, run folder or process group
        model_cfg = read_config(cfg.model.path) if cfg.model.path else \
            tiny_config(cfg.model.tiny, vocab_size=cfg.model.tokenizer_vocab)
        world = cfg.run.dry_run_world or int(os.environ.get("WORLD_SIZE", 1))
        print(run_table(cfg, model_cfg, world))
        fits, verdict = fits_verdict(cfg, model_cfg, world)
        print(verdict)
        return {"dry_run": True, "fits": fits}
    out = prepare_run_dir(cfg, "python -m emor3.grpo.train", can_resume=True)  # before anything is written
    try:
        return _train(cfg, out)
    finally:
        unlock_folder(out)  # the process may go on (a test, an ablation): the folder is free once the run ends


def _train(cfg: Config, out) -> dict:
    """``train`` once the run folder is prepared and locked."""
    resuming = bool(cfg.run.resume)
    # what a result depends on besides the config: same seed and thread count on the same machine repeat exactly
    dist.print0(f"[emor3] seed {cfg.run.seed}, torch threads {set_threads(cfg)}, device {cfg.model.device}")
    launched = dist.init(cfg.run.dist_timeout, cfg.run.dist_setup_timeout, cfg.model.device)  # torchrun: join the group
    W, g = dist.world_size(), cfg.grpo
    if g.prompts_per_step % W or g.mini_batch_prompts % W:
        raise ValueError(f"--grpo.prompts-per-step ({g.prompts_per_step}) and --grpo.mini-batch-prompts "
                         f"({g.mini_batch_prompts}) must be multiples of the number of processes ({W})")
    if W > 1 and cfg.algorithm().dynamic_sampling:
        raise NotImplementedError("DAPO dynamic sampling refills a varying number of groups per rank; it is not "
                                  "supported under torchrun yet: run it on one process")

    # ---- setup: rank 0 first (it writes the shared files: data cache, tiny model, SFT checkpoint, baseline) ----
    with dist.rank0_first("setup (data, model, Cold-Start SFT, baseline evaluation)"):
        exp = build_experiment(cfg, out)  # model (or the resumed policy), processor, data, reward setup
        if dist.is_main() and not resuming:  # the data is sound: the settings go on disk before Cold-Start SFT
            save_config(cfg, out / "config.toml")
        cold_start(exp, out)  # Cold-Start SFT into RUN_DIR/sft, unless resuming
        baseline = evaluate_baseline(exp, out) if dist.is_main() else None  # the table's first row
    attach_adapters(exp)  # LoRA: fresh adapters on the model GRPO starts from (a resumed run has its own)
    attach_reference(exp, out)  # the frozen model GRPO starts from, when β > 0 or it judges (none with LoRA)
    # training handles: forward = teacher-forced log-probs; FSDP2-sharded or DDP-wrapped under torchrun
    policy = dist.wrap_policy(exp.model, cfg.run.parallel, exp.device, cfg.run.mixed_precision)
    reference = None if exp.reference is None else dist.wrap_reference(
        exp.reference, cfg.run.reference, cfg.run.parallel, exp.device, cfg.run.mixed_precision)
    if has_lora(exp.model) and cfg.algorithm().kl_coef > 0 and reference is None:  # LoRA: the policy, adapters off
        reference = AdaptersOff(policy, exp.model)
    if g.sample_chunk == 0 and exp.device.type == "cuda":  # the largest sampling chunk that fits this GPU
        cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(g, sample_chunk=auto_sample_chunk(cfg, exp, W)))
        exp, g = dataclasses.replace(exp, cfg=cfg), cfg.grpo  # one config from here on: the step reads exp.cfg too
    dist.print0(run_table(cfg, exp.model.config, W))
    if not resuming:
        if dist.is_main():
            save_config(cfg, out / "config.toml")
        record_lineage(exp, out)  # what the run starts from, by content hash: a resume checks it
    optimizer = torch.optim.AdamW([p for p in exp.model.parameters() if p.requires_grad], lr=g.lr,
                                  weight_decay=g.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(g.warmup_steps, g.steps, g.schedule))
    stream = PromptStream(len(exp.train_set), cfg.run.seed)
    start_step = 0
    if exp.resume_dir is not None:
        state = load_trainer_state(exp.resume_state, optimizer, scheduler, model=exp.model)
        start_step = state["step"]
        if g.steps < start_step:
            raise RunFolderError(f"--resume {out}: --grpo.steps {g.steps} is before the checkpoint's step "
                                 f"{start_step}: python -m emor3.grpo.train --resume {out} --grpo.steps {start_step} "
                                 "(or more)")
        if dist.is_main():
            record_resume_changes(cfg, out, start_step)
        stream = PromptStream(len(exp.train_set), cfg.run.seed, **state["data"])
        dist.print0(f"[emor3] resumed from {exp.resume_dir} at step {start_step} (written by "
                    f"{state.get('world_size', 1)} process(es), now {W})")

    # ---- the loop: one grpo_step each, then log and checkpoint ------------------------------------------------
    cfg_dict = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    resume_step = start_step if exp.resume_dir is not None else None
    sink = MetricsSink(out, cfg.run.logger, cfg_dict, resume_step) if dist.is_main() else NullSink()
    stop = StopFlag()
    bar = tqdm(range(start_step, g.steps), initial=start_step, total=g.steps, desc="GRPO",
               disable=not (cfg.run.progress and dist.is_main()), dynamic_ncols=True)
    step = start_step
    for step in bar:
        m, samples = grpo_step(exp, cfg, stream, policy, reference, optimizer, scheduler, step)
        sink.log(step + 1, m)
        if "reward/total" in m:
            bar.set_postfix(reward=f"{m['reward/total']:.3f}", acc=f"{m['accuracy']:.2f}", s=f"{m['time/step']:.1f}")
        done = step + 1 == g.steps
        if cfg.run.sample_every and ((step + 1) % cfg.run.sample_every == 0 or done) and samples:  # the last step too
            sink.log_samples(step + 1, samples)
        if dist.any_rank(stop.signal is not None) and stop.signal is None:  # another rank got the signal: stop together
            stop.signal = signal.SIGTERM
        if stop.signal is not None or done or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
            save_checkpoint(exp, out, step + 1, optimizer, scheduler, stream.state())
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

    # ---- evaluation: the paper-style table (rank 0 alone, on the whole model) ---------------------------------
    if launched:
        main_rank = dist.is_main()
        dist.barrier("end of training")
        dist.shutdown()  # evaluation below issues no collectives; the other ranks are done
        if not main_rank:
            return {}
        final = latest_checkpoint(out)
        if cfg.run.parallel == "fsdp" and final is not None:  # the final checkpoint, unsharded
            exp.model = load_policy(cfg, final, start_dir(out, exp.source_dir), exp.device)
    return evaluate_experiment(exp, cfg, out, baseline)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, "python -m emor3.grpo.train", DESCRIPTION)
    with dist.guard("the GRPO run"):  # a failed collective (a crashed rank) ends with an error that says so
        run_cli(train, cfg, debug=wants_debug(argv))


if __name__ == "__main__":
    main()
