"""Both cores for the tiny default run: one process of 2 torch threads vs 2 torchrun processes (gloo) of 1 thread.

Each configuration runs ``--steps`` default-size GRPO steps (``profile_step``'s set-up: the default run's settings,
started from the Cold-Start checkpoint ``--model``, so set-up takes seconds) through the trainer's own step
(``grpo_step``; under torchrun each process takes its share of the 16 prompts, the policy wrapped as the trainer
wraps it, ``--run.parallel`` fsdp by default). The two configurations run alternately, ``--rounds`` times each, and
the report gives, per configuration, the median step time over steps 3..N of every round, the whole command's wall
time, and the completions' mean length (the rollouts of one and two processes are not the same samples: each
process seeds its own share's sampling, as a default run does; see README "Several GPUs").

    .venv/bin/python benchmarks/bench_parallel.py --steps 8 --rounds 2 --model /tmp/emor3_profile_step/run/sft \\
        --json benchmarks/profile_runs/parallel.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAG = "@@par "


def worker(args) -> None:
    """One process of the run (rank 0 prints the step times)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import profile_step as ps  # noqa: E402  (puts REPO first on sys.path)
    import torch  # noqa: E402

    from emor3 import distributed as dist  # noqa: E402
    from emor3.grpo.rollout import PromptStream  # noqa: E402
    from emor3.grpo.step import grpo_step  # noqa: E402
    from emor3.stages.grpo import optimizer_for, rollout_setup, training_handles  # noqa: E402

    dist.init()  # torchrun: join the group (gloo on the CPU); a no-op for one process
    work = Path(args.work)
    ns = argparse.Namespace(model=args.model, sft_steps=0, threads=args.threads, seed=0)
    with dist.rank0_first("setup"):  # one run folder, written by rank 0 first, as the trainer does
        if dist.is_main():
            work.mkdir(parents=True, exist_ok=True)
            if not (work / "emoscenes").exists():
                (work / "emoscenes").symlink_to(Path(args.data_cache))
        cfg, run, model, ref_model, _, setup_s = ps.build(ns, work)
    policy, reference = training_handles(cfg, model, ref_model, run.device)
    setup = rollout_setup(cfg, run, model, ref_model)
    optimizer, scheduler = optimizer_for(cfg, model)
    stream = PromptStream(len(run.train_set), cfg.run.seed)
    steps = []
    for i in range(args.steps):
        m, _ = grpo_step(cfg, setup, stream, policy, reference, optimizer, scheduler, i)
        steps.append({"step_s": m["time/step"], "completion_len_mean": m["completion_len_mean"],
                      **{k: m[k] for k in ("time/rollout", "time/judge", "time/reference", "time/update")}})
    if dist.is_main():
        print(TAG + json.dumps({"world": dist.world_size(), "threads": torch.get_num_threads(),
                                "parallel": cfg.run.parallel, "setup_s": setup_s, "steps": steps}), flush=True)
    dist.shutdown()


def run(kind: str, args, work: Path) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps), "--model", args.model,
          "--data-cache", args.data_cache, "--work", str(work)]
    if kind == "1x2":
        cmd = [sys.executable, *me, "--threads", "2"]
        threads = 2
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc-per-node", "2", *me, "--threads", "1"]
        threads = 1
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    if args.omp_wait_policy:  # OpenMP threads that spin (ACTIVE) or sleep (PASSIVE) between parallel regions
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(TAG)]
    if p.returncode or not lines:
        raise RuntimeError(f"{kind} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(lines[-1][len(TAG):])
    res["wall_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="/tmp/emor3_profile_step/run/sft")
    ap.add_argument("--data-cache", default="", help="EmoScenes cache (default: beside --model's run folder)")
    ap.add_argument("--work", default="/tmp/emor3_bench_parallel")
    ap.add_argument("--omp-wait-policy", default="", choices=["", "ACTIVE", "PASSIVE"],
                    help="OMP_WAIT_POLICY for both configurations (default: the OpenMP runtime's own)")
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.data_cache = args.data_cache or str(Path(args.model).resolve().parents[1] / "emoscenes")
    if args.worker:
        return worker(args)
    if args.steps < 3:
        ap.error("--steps must be >= 3")
    load_before = os.getloadavg()
    res = {"1x2": [], "2x1": []}
    for r in range(args.rounds):
        for kind in (("1x2", "2x1") if r % 2 == 0 else ("2x1", "1x2")):
            out = run(kind, args, Path(args.work) / f"{kind}-{r}")
            res[kind].append(out)
            med = statistics.median(s["step_s"] for s in out["steps"][2:])
            print(f"[parallel] round {r + 1} {kind}: median step {med:.2f} s (steps 3..{args.steps}), wall "
                  f"{out['wall_s']:.1f} s, mean completion length "
                  f"{statistics.mean(s['completion_len_mean'] for s in out['steps']):.1f}", flush=True)
    summary = {}
    for kind, outs in res.items():
        window = [s for o in outs for s in o["steps"][2:]]
        summary[kind] = {"median_step_s": statistics.median(s["step_s"] for s in window),
                         **{f"median_{k}": statistics.median(s[k] for s in window)
                            for k in ("time/rollout", "time/judge", "time/reference", "time/update")},
                         "wall_s": [o["wall_s"] for o in outs], "setup_s": [o["setup_s"] for o in outs],
                         "completion_len_mean": statistics.mean(s["completion_len_mean"] for s in window),
                         "parallel": outs[0]["parallel"]}
    ratio = summary["1x2"]["median_step_s"] / summary["2x1"]["median_step_s"]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    out = {"what": "bench_parallel: 1 process x 2 threads vs torchrun 2 processes x 1 thread (gloo)",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                                    if ln.startswith("Model name")), "?"), "cpu_count": os.cpu_count(),
                       "platform": platform.platform()},
           "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "load_before": load_before,
           "omp_wait_policy": args.omp_wait_policy or "runtime default",
           "load_after": os.getloadavg(), "summary": summary, "step_ratio_1x2_over_2x1": ratio, "runs": res}
    print(json.dumps({k: out[k] for k in ("summary", "step_ratio_1x2_over_2x1", "load_before", "load_after")},
                     indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
