"""Where one default-size GRPO step spends its time: a per-phase breakdown and a torch.profiler table.

The step is the default run's (``python -m emor3.grpo.train`` with no flags): the tiny model from the shipped instruct
checkpoint, EmoScenes, ``emo_r3`` (16 prompts x 8 samples, at most 80 new tokens, the RER judge sampling 8-token
replies from the policy for both questions, β = 0.01 k3 KL to the frozen reference, one update of 64-row
micro-batches). The model GRPO starts from is, in order of preference:
  - ``--model DIR``: a Cold-Start checkpoint folder (a default run's RUN_DIR/sft, or this script's WORK/run/sft):
    its weights are loaded into the run's model, no SFT;
  - else the run's own pipeline: the instruct stage (shipped) and Cold-Start SFT for ``--sft-steps`` steps (the
    default run's 300; 0 starts GRPO from the instruct model, whose completions differ in length, so its steps cost
    differently). The output says which one ran.
The step's cost depends on completion lengths, so the tokens decoded per step are reported with the times.

It builds the run as ``emor3.grpo.train`` does (``build``, the instruct stage, ``cold_start``,
``reference_model``), then calls ``grpo_step`` ``--steps`` times at ``--threads`` torch threads and reports:
  (a) per phase, the median over steps 3..N (1-based) of: the rollout (prompt encoding; the sampler's prefill, decode
      steps = model forward + token choice, the decode loop's bookkeeping, detokenising), the RER judge (request
      building and encoding; its prefill, decode steps, loop bookkeeping, detokenising), the rule rewards, the
      reference log-probs, the update (policy forward, backward, gradient clip, AdamW, the rest: loss and metrics),
      and the rest of the step. The coarse phases are the step's own metrics (time/rollout, time/judge,
      time/reference, time/update, time/step); the finer ones come from timers this script wraps around the
      functions the step calls (module attributes patched for the run, restored after; emor3's code is unchanged);
  (b) one more step under torch.profiler: the top 15 ops by self CPU time, the number of aten ops (all dispatched
      events, and top-level ones: those not called from another aten op), the host syncs (aten::item /
      aten::_local_scalar_dense / aten::is_nonzero: each a device-to-host read on a GPU; on a CPU a cheap read, but
      still a point the step waits), both per step and per phase, and the share of the step's wall time spent
      inside aten ops vs outside them (Python, dispatch glue and the profiler's own per-op cost);
  (c) tokens per step: the completion tokens the rollout decoded, the decode steps and row-steps computed (rows
      times steps, finished rows included until compaction drops them), the judge's replies likewise, and the
      prompt tokens prefilled.
Medians of the parts need not add up to the median of the whole.

    .venv/bin/python benchmarks/profile_step.py --steps 12 --threads 1 --json benchmarks/profile_runs/step-1thread.json
    .venv/bin/python benchmarks/profile_step.py --steps 3 --sft-steps 0        # a quick check of the script

Shape legend: B prompts (16), G samples per prompt (8), N = B·G rows (128), T completion length (<= 80).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import emor3.engine.sampler as sampler_mod  # noqa: E402
import emor3.grpo.rollout as rollout_mod  # noqa: E402
import emor3.grpo.step as step_mod  # noqa: E402
import emor3.rewards.reflection as reflection_mod  # noqa: E402
from emor3.config import parse_args  # noqa: E402
from emor3.stages.build import build as build_run, reference_model, with_adapters  # noqa: E402
from emor3.run_folder import start_dir  # noqa: E402
from emor3.stages.grpo import optimizer_for, rollout_setup, training_handles  # noqa: E402
from emor3.grpo.rollout import PromptStream  # noqa: E402
from emor3.grpo.step import grpo_step  # noqa: E402
from emor3.models import load_pretrained  # noqa: E402
from emor3.stages.cold_start import cold_start  # noqa: E402
from emor3.toy import instruct  # noqa: E402
from emor3.toy.world import WORLD  # noqa: E402

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero")
# the ops that do the arithmetic of a linear layer or attention (forward and backward)
ARITH_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_scaled_dot_product_attention_math",
             "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward",
             "aten::embedding_dense_backward")
LABEL = "ps::"  # record_function labels of this script's phases (only while the profiler runs)


# --------------------------------------------------------------------------------------------- phase timers


class Phases:
    """Seconds per phase name, accumulated over one step by the wrappers below; ``where`` is the current coarse
    phase ("rollout" or "judge") that the sampler's prefill / decode timers are booked to."""

    def __init__(self):
        self.label = False  # add record_function labels (the profiled step)
        self.reset()

    def reset(self):
        self.s: dict[str, float] = defaultdict(float)
        self.n: Counter = Counter()
        self.where = "rollout"
        self.masks: list[tuple[str, torch.Tensor]] = []  # (phase, completion mask) of each sample() call
        self.prefill_tokens: Counter = Counter()

    @contextlib.contextmanager
    def timed(self, name: str):
        ctx = record_function(LABEL + name) if self.label else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            try:
                yield
            finally:
                self.s[name] += time.perf_counter() - t0

    @contextlib.contextmanager
    def phase(self, where: str):
        old, self.where = self.where, where
        try:
            yield
        finally:
            self.where = old


PH = Phases()


def install_timers() -> list[tuple[object, str, object]]:
    """Wrap the functions the step calls with PH's timers; returns what to restore."""
    saved = []

    def patch(obj, name, wrapper):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, wrapper(getattr(obj, name)))

    def sampled(phase):  # a sampler call of the rollout or of the judge (each module imported `sample`)
        def wrap(fn):
            def w(*a, **kw):
                with PH.phase(phase), PH.timed(f"{phase}/sample"):
                    r = fn(*a, **kw)
                PH.masks.append((phase, r.completion_mask))
                return r
            return w
        return wrap

    def prefill(fn):  # emor3.engine.sampler.prefill, called by sample()
        def w(model, batch, *a, **kw):
            B, P0 = batch.input_ids.shape
            suffix = kw.get("suffix")
            PH.prefill_tokens[PH.where] += B * P0 + (suffix.input_ids.numel() if suffix is not None else 0)
            with PH.timed(f"{PH.where}/prefill"):
                return fn(model, batch, *a, **kw)
        return w

    def get_step(fn):  # emor3.engine.sampler._get_step: the decode step sample() calls once per token
        def w(*a, **kw):
            step = fn(*a, **kw)

            def timed_step(model, cache, tokens, *rest, **kw2):
                PH.n[f"{PH.where}/decode_steps"] += 1
                PH.n[f"{PH.where}/decode_row_steps"] += tokens.shape[0]
                with PH.timed(f"{PH.where}/decode_step"):
                    return step(model, cache, tokens, *rest, **kw2)
            return timed_step
        return w

    def detok(fn):
        def w(*a, **kw):
            with PH.timed(f"{PH.where}/detokenize"):
                return fn(*a, **kw)
        return w

    def simple(name):
        def wrap(fn):
            def w(*a, **kw):
                with PH.timed(name):
                    return fn(*a, **kw)
            return w
        return wrap

    def reflect(fn):
        def w(*a, **kw):
            with PH.phase("judge"), PH.timed("judge/total"):
                return fn(*a, **kw)
        return w

    def micro_logprobs(fn):  # the teacher-forced forward: reference (no grad) or the update's (grad)
        def w(*a, **kw):
            with PH.timed("update/forward" if torch.is_grad_enabled() else "reference/forward"):
                return fn(*a, **kw)
        return w

    patch(rollout_mod, "sample", sampled("rollout"))
    patch(reflection_mod, "sample", sampled("judge"))
    patch(sampler_mod, "prefill", prefill)
    patch(sampler_mod, "_get_step", get_step)
    patch(sampler_mod, "_decode_texts", detok)
    patch(rollout_mod, "reflect", reflect)
    patch(rollout_mod, "compute_rewards", simple("rewards"))
    patch(rollout_mod, "encode_samples", simple("rollout/encode_prompts"))
    patch(step_mod, "micro_logprobs", micro_logprobs)
    patch(torch.Tensor, "backward", simple("update/backward"))
    patch(torch.nn.utils, "clip_grad_norm_", simple("update/clip_grad"))
    return saved


def restore(saved) -> None:
    for obj, name, fn in reversed(saved):
        setattr(obj, name, fn)


def breakdown(m: dict, s: dict) -> dict[str, float]:
    """One step's phases in seconds: the step's own metrics split by this script's timers."""
    g = lambda k: s.get(k, 0.0)  # noqa: E731
    rollout, judge_and_rewards = m["time/rollout"], m["time/judge"]
    out = {
        "rollout": rollout,
        "rollout/encode_prompts": g("rollout/encode_prompts"),
        "rollout/prefill": g("rollout/prefill"),
        "rollout/decode_steps": g("rollout/decode_step"),
        "rollout/decode_loop_bookkeeping": g("rollout/sample") - g("rollout/prefill") - g("rollout/decode_step")
        - g("rollout/detokenize"),
        "rollout/detokenize": g("rollout/detokenize"),
        "rollout/rest": rollout - g("rollout/sample") - g("rollout/encode_prompts"),
        "judge": g("judge/total"),
        "judge/prefill": g("judge/prefill"),
        "judge/decode_steps": g("judge/decode_step"),
        "judge/decode_loop_bookkeeping": g("judge/sample") - g("judge/prefill") - g("judge/decode_step")
        - g("judge/detokenize"),
        "judge/detokenize": g("judge/detokenize"),
        "judge/requests_encode_parse": g("judge/total") - g("judge/sample"),
        "rewards": g("rewards"),
        "scoring_rest": judge_and_rewards - g("judge/total") - g("rewards"),  # records of each row, answers
        "reference": m["time/reference"],
        "update": m["time/update"],
        "update/forward": g("update/forward"),
        "update/backward": g("update/backward"),
        "update/clip_grad": g("update/clip_grad"),
        "update/optimizer": g("update/optimizer"),
        "update/rest": m["time/update"] - g("update/forward") - g("update/backward") - g("update/clip_grad")
        - g("update/optimizer"),
        "step": m["time/step"],
    }
    # advantages, micro-batch lists, model.eval/train: the step's time outside its four timed phases
    out["other"] = out["step"] - rollout - judge_and_rewards - out["reference"] - out["update"]
    return out


def token_counts() -> dict[str, int]:
    out = {f"{k}_tokens": 0 for k in ("rollout", "judge")}
    for where, mask in PH.masks:
        out[f"{where}_tokens"] += int(mask.sum())
    out.update({k.replace("/", "_"): v for k, v in PH.n.items()})
    out.update({f"{k}_prefill_tokens": v for k, v in PH.prefill_tokens.items()})
    return out


# --------------------------------------------------------------------------------------------- the profiled step


def profile_summary(prof, wall: float) -> dict:
    """Top ops, op and sync counts (per step and per phase), time inside aten ops (per step and per phase)."""
    events = prof.events()
    avgs = prof.key_averages()
    top = sorted((e for e in avgs if not e.key.startswith(LABEL)), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in avgs if not e.key.startswith(LABEL))
    rows = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_cpu_pct": 100 * e.self_cpu_time_total / max(total_self, 1), "cpu_total_ms": e.cpu_time_total / 1e3,
             "self_us_per_call": e.self_cpu_time_total / max(e.count, 1)} for e in top[:15]]
    table = avgs.table(sort_by="self_cpu_time_total", row_limit=15)

    def label_of(ev):  # the innermost phase label around ev (None outside every label)
        p = ev.cpu_parent
        while p is not None:
            if p.name.startswith(LABEL):
                return p
            p = p.cpu_parent
        return None

    def top_level(ev) -> bool:
        p = ev.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    # each phase's exclusive wall time: its labelled ranges minus the labelled ranges nested in them
    phase = defaultdict(lambda: {"wall_ms": 0.0, "aten_self_ms": 0.0, "arith_self_ms": 0.0, "top_level_ops": 0,
                                 "host_syncs": 0, "ops": Counter()})
    for ev in events:
        if ev.name.startswith(LABEL):
            d = ev.time_range.elapsed_us() / 1e3
            phase[ev.name[len(LABEL):]]["wall_ms"] += d
            parent = label_of(ev)
            if parent is not None:
                phase[parent.name[len(LABEL):]]["wall_ms"] -= d
    n_all = n_top = 0
    syncs = Counter()
    for ev in events:
        if not ev.name.startswith("aten::"):
            continue
        n_all += 1
        lab = label_of(ev)
        ph = phase[lab.name[len(LABEL):] if lab is not None else "unlabelled"]
        ph["aten_self_ms"] += ev.self_cpu_time_total / 1e3
        ph["ops"][ev.name] += ev.self_cpu_time_total / 1e3
        if ev.name in ARITH_OPS:
            ph["arith_self_ms"] += ev.self_cpu_time_total / 1e3
        if ev.name in SYNC_OPS:
            syncs[ev.name] += 1
        if ev.name == "aten::_local_scalar_dense":  # what item / is_nonzero / int() / bool() of a tensor all reach
            ph["host_syncs"] += 1
        if top_level(ev):
            n_top += 1
            ph["top_level_ops"] += 1
    per_phase = {}
    for k, v in phase.items():
        ops = v.pop("ops")
        v["top_ops_ms"] = {op: round(ms, 2) for op, ms in ops.most_common(3)}
        v["outside_aten_ms"] = v["wall_ms"] - v["aten_self_ms"]
        per_phase[k] = v
    inside = sum(e.self_cpu_time_total for e in avgs if e.key.startswith("aten::")) / 1e6
    arith = sum(v["arith_self_ms"] for v in per_phase.values()) / 1e3
    return {"top_ops": rows, "table": table, "aten_events": n_all, "aten_top_level_ops": n_top,
            "host_syncs": syncs.get("aten::_local_scalar_dense", 0), "sync_entry_ops": dict(syncs),
            "per_phase": per_phase, "wall_s_profiled": wall, "inside_aten_s": inside, "arith_ops_self_s": arith,
            "outside_aten_s": wall - inside}


# --------------------------------------------------------------------------------------------- driver


def build(args, work: Path):
    """The default run's stages up to GRPO at --threads, started from --model or from the run's own pipeline."""
    out = work / "run"
    out.mkdir(parents=True, exist_ok=True)
    sft_steps = 0 if args.model else args.sft_steps
    cfg = parse_args(["--run.out", str(out), "--run.threads", str(args.threads), "--run.progress", "false",
                      "--data.cache-dir", str(work / "emoscenes"), "--sft.instruct-cache", str(work / "instruct"),
                      "--sft.steps", str(sft_steps), "--run.seed", str(args.seed)],
                     "benchmarks/profile_step.py", "")
    if not args.model:  # a fresh Cold-Start checkpoint (or none) for this run
        shutil.rmtree(out / "sft", ignore_errors=True)
    t0 = time.perf_counter()
    run = build_run(cfg, out, WORLD)
    if instruct.applies(cfg):  # the shipped instruct checkpoint
        run = instruct.instruct_stage(cfg, run, out)
    model = cold_start(cfg, run, out)  # Cold-Start SFT unless --sft-steps 0
    if args.model:  # a Cold-Start checkpoint: its weights, the run's own (default) settings
        saved = load_pretrained(Path(args.model), dtype=getattr(torch, cfg.model.dtype), device=run.device)
        model.load_state_dict(saved.state_dict())
        start = f"Cold-Start checkpoint {args.model}"
    elif sft_steps:
        start = f"the run's own pipeline: shipped instruct checkpoint + Cold-Start SFT {sft_steps} steps (seed {args.seed})"
    else:
        start = "the shipped instruct checkpoint, no Cold-Start SFT (--sft-steps 0)"
    model = with_adapters(model, cfg)
    ref_model = reference_model(cfg, model, run.source_dir, start_dir(out, run.source_dir), False, run.device)
    setup_s = time.perf_counter() - t0
    return cfg, run, model, ref_model, start, setup_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed GRPO steps; the median is over steps 3..N (1-based)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (--run.threads)")
    ap.add_argument("--model", default="", help="a Cold-Start checkpoint folder to start from (no SFT)")
    ap.add_argument("--sft-steps", type=int, default=300, help="Cold-Start SFT steps when no --model (the default "
                    "run's 300; 0: GRPO from the instruct model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="", help="folder for the run, data cache and instruct cache "
                    "(default: $TMPDIR/emor3_profile_step)")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler step")
    ap.add_argument("--json", default="", help="write the result as JSON here")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the median is over steps 3..N)")
    work = Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / "emor3_profile_step"
    work.mkdir(parents=True, exist_ok=True)

    cfg, run, model, ref_model, start, setup_s = build(args, work)
    g = cfg.grpo
    policy, reference = training_handles(cfg, model, ref_model, run.device)
    setup = rollout_setup(cfg, run, model, ref_model)
    optimizer, scheduler = optimizer_for(cfg, model)
    # AdamW's step, timed by the optimizer's own hooks (its step method stays the one the scheduler wrapped)
    opt_timer = []

    def opt_start(*_):
        opt_timer.append(PH.timed("update/optimizer"))
        opt_timer[-1].__enter__()

    def opt_end(*_):
        opt_timer.pop().__exit__(None, None, None)

    optimizer.register_step_pre_hook(opt_start)
    optimizer.register_step_post_hook(opt_end)
    stream = PromptStream(len(run.train_set), cfg.run.seed)
    load_before = os.getloadavg()
    print(f"[profile_step] start: {start}; setup {setup_s:.1f} s; torch threads {torch.get_num_threads()}; "
          f"{g.prompts_per_step} prompts x {g.group_size} samples, <= {g.max_new_tokens} tokens, algo {g.algo}, "
          f"judge {cfg.reward.judge} ({cfg.reward.judge_mode}, <= {cfg.reward.judge_max_new_tokens} tokens), "
          f"micro-batch {g.micro_batch_rows} rows; load {load_before[0]:.2f}", flush=True)

    saved = install_timers()
    steps = []
    try:
        for i in range(args.steps):
            PH.reset()
            t0 = time.perf_counter()
            m, _ = grpo_step(cfg, setup, stream, policy, reference, optimizer, scheduler, i)
            wall = time.perf_counter() - t0
            assert "time/update" in m, f"step {i + 1} was skipped (no informative group): {m}"
            rec = {"step": i + 1, "wall_s": wall, "phases_s": breakdown(m, PH.s), "tokens": token_counts(),
                   "completion_len_mean": m["completion_len_mean"], "reward_total": m["reward/total"],
                   "accuracy": m["accuracy"], "format_rate": m["format_rate"]}
            steps.append(rec)
            print(f"[profile_step] step {i + 1}: {m['time/step']:.2f} s (rollout {m['time/rollout']:.2f}, judge+rewards "
                  f"{m['time/judge']:.2f}, reference {m['time/reference']:.2f}, update {m['time/update']:.2f}); "
                  f"{rec['tokens']['rollout_tokens']} completion tokens, mean len {m['completion_len_mean']:.1f}",
                  flush=True)
        prof_res = None
        if not args.no_profile:
            PH.reset()
            PH.label = True
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                with record_function(LABEL + "step"):
                    m, _ = grpo_step(cfg, setup, stream, policy, reference, optimizer, scheduler, args.steps)
                wall = time.perf_counter() - t0
            PH.label = False
            prof_res = profile_summary(prof, wall)
            prof_res["step_metrics_s"] = {k: m[k] for k in ("time/rollout", "time/judge", "time/reference",
                                                            "time/update", "time/step")}
            prof_res["tokens"] = token_counts()
    finally:
        restore(saved)
    load_after = os.getloadavg()

    window = steps[2:]  # steps 3..N (1-based)
    keys = list(window[0]["phases_s"])
    median = {k: statistics.median(r["phases_s"][k] for r in window) for k in keys}
    tok_keys = sorted({k for r in window for k in r["tokens"]})
    tokens = {k: statistics.median(r["tokens"].get(k, 0) for r in window) for k in tok_keys}
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    res = {
        "what": "profile_step: one default-size GRPO step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": model_name, "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__, "commit": commit, "threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "start_model": start, "setup_s": setup_s,
        "workload": {"prompts": g.prompts_per_step, "group_size": g.group_size, "max_new_tokens": g.max_new_tokens,
                     "algo": g.algo, "judge": cfg.reward.judge, "judge_mode": cfg.reward.judge_mode,
                     "judge_max_new_tokens": cfg.reward.judge_max_new_tokens, "micro_batch_rows": g.micro_batch_rows,
                     "kl_coef": cfg.algorithm().kl_coef, "sample_chunk": g.sample_chunk, "compile": g.compile},
        "load_before": load_before, "load_after": load_after,
        "median_over": f"steps 3..{args.steps}",
        "median_phases_s": median, "median_tokens": tokens, "steps": steps, "profile": prof_res,
    }
    print(report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


def report(res: dict) -> str:
    med, step = res["median_phases_s"], res["median_phases_s"]["step"]
    lines = [f"# profile_step: {res['workload']}, threads {res['threads']}, start: {res['start_model']}",
             f"median over {res['median_over']} (step wall {statistics.median(r['wall_s'] for r in res['steps'][2:]):.2f} s "
             f"incl. metrics); load {res['load_before'][0]:.2f} -> {res['load_after'][0]:.2f}", "",
             "| phase | median s | % of step |", "|---|---|---|"]
    for k, v in med.items():
        name = k if "/" not in k else "  " + k
        lines.append(f"| {name} | {v:.3f} | {100 * v / step:.1f} |")
    t = res["median_tokens"]
    lines += ["", "tokens per step (median): " + ", ".join(f"{k} {v:g}" for k, v in t.items())]
    p = res["profile"]
    if p:
        lines += ["", f"profiled step: wall {p['wall_s_profiled']:.2f} s (under the profiler), aten events "
                  f"{p['aten_events']}, top-level aten ops {p['aten_top_level_ops']}, host syncs {p['host_syncs']} "
                  f"(entered through {p['sync_entry_ops']}); inside aten ops {p['inside_aten_s']:.2f} s (of which "
                  f"matmul/attention/conv {p['arith_ops_self_s']:.2f} s), outside {p['outside_aten_s']:.2f} s",
                  "", "| phase (profiled step, exclusive) | wall ms | in aten ms | of it matmul/attn ms | outside aten ms "
                  "| top-level aten ops | host syncs | top ops (self ms) |", "|---|---|---|---|---|---|---|---|"]
        for k, v in sorted(p["per_phase"].items()):
            tops = ", ".join(f"{op.replace('aten::', '')} {ms:.1f}" for op, ms in v["top_ops_ms"].items())
            lines.append(f"| {k} | {v['wall_ms']:.1f} | {v['aten_self_ms']:.1f} | {v['arith_self_ms']:.1f} | "
                         f"{v['outside_aten_ms']:.1f} | {v['top_level_ops']} | {v['host_syncs']} | {tops} |")
        lines += ["", "| op | calls | self CPU ms | self % | us per call |", "|---|---|---|---|---|"]
        for r in p["top_ops"]:
            lines.append(f"| {r['op']} | {r['calls']} | {r['self_cpu_ms']:.1f} | {r['self_cpu_pct']:.1f} | "
                         f"{r['self_us_per_call']:.1f} |")
        lines += ["", p["table"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
