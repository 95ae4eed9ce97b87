"""Same-invocation A/B of one default-size GRPO step: a baseline commit against the current tree, step by step.

The baseline commit is checked out into a temporary ``git worktree``. Two worker processes (this script with
``--worker``) build the default run's experiment, one from each tree (each imports its own ``emor3`` and uses its
own ``benchmarks/profile_step.py`` for the set-up and the per-phase timers), both from the same Cold-Start
checkpoint (``--model``), at ``--threads`` torch threads. The driver then asks them for one GRPO step at a time,
alternating which side goes first, so the two sides see the same machine load and never run at the same time.
It reports, per side, the median over steps 3..N of every phase of ``profile_step`` (coarse phases from the step's
own metrics, finer ones from its timers), and the ratio baseline / current per phase.

Exactness: each worker returns a digest of every step (the rollout's tokens, its log-probs, the judge's reply
tokens, the rewards, the loss and the model's weights after the update, all as bytes). Equal digests mean the two
trees computed the same step bit for bit; the report says, per step, which parts agree. A change that is not
exact (an opt-in setting passed with ``--new-args``) is expected to differ and is reported as such.

    .venv/bin/python benchmarks/bench_step_ab.py --baseline-commit 3806520 --steps 12 --threads 1 \\
        --model /tmp/emor3_profile_step/run/sft --json benchmarks/profile_runs/ab-1thread.json
    ... --new-args "--grpo.shared-prefix-decode true"   # config flags for the current tree's side only

Shape legend: B prompts (16), G samples per prompt (8), N = B·G rows (128), T completion length (<= 80).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAG = "@@ab "  # prefix of the worker's protocol lines on stdout (everything else it prints is passed through)
COARSE = ("rollout", "judge", "rewards", "reference", "update", "step")


# --------------------------------------------------------------------------------------------- worker


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def worker(args) -> None:
    """Build the run from ``--tree`` and answer "step" lines on stdin with one JSON result line each."""
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    import torch  # noqa: E402

    spec = importlib.util.spec_from_file_location("profile_step", tree / "benchmarks" / "profile_step.py")
    ps = importlib.util.module_from_spec(spec)
    sys.modules["profile_step"] = ps
    spec.loader.exec_module(ps)  # its own sys.path entry is `tree` too: emor3 comes from this tree
    import emor3  # noqa: E402
    assert Path(emor3.__file__).resolve().is_relative_to(tree), f"emor3 imported from {emor3.__file__}, not {tree}"
    from emor3 import distributed as dist  # noqa: E402
    from emor3.grpo.rollout import PromptStream  # noqa: E402
    from emor3.grpo.step import grpo_step  # noqa: E402

    extra = shlex.split(args.cfg_args)
    if extra:  # config flags for this side: appended to the ones profile_step.build passes
        orig = ps.parse_args
        ps.parse_args = lambda argv, *a, **kw: orig(list(argv) + extra, *a, **kw)
    ns = argparse.Namespace(model=args.model, sft_steps=0, threads=args.threads, seed=args.seed)
    work = Path(args.work)
    built = ps.build(ns, work)
    if len(built) == 4:  # a tree whose stages share one Experiment (emor3.experiment; commits before emor3.stages)
        from emor3.grpo.train import lr_lambda  # noqa: E402
        cfg, exp, start, setup_s = built
        model, ref_model, device, n_train = exp.model, exp.reference, exp.device, len(exp.train_set)

        def one_step(*a):
            return grpo_step(exp, cfg, *a)
    else:  # the stages as functions (emor3.stages)
        from emor3.stages.grpo import lr_lambda, rollout_setup  # noqa: E402
        cfg, run, model, ref_model, start, setup_s = built
        device, n_train = run.device, len(run.train_set)
        setup = rollout_setup(cfg, run, model, ref_model)

        def one_step(*a):
            return grpo_step(cfg, setup, *a)
    g = cfg.grpo
    policy = dist.wrap_policy(model, cfg.run.parallel, device, cfg.run.mixed_precision)
    reference = None if ref_model is None else dist.wrap_reference(
        ref_model, cfg.run.reference, cfg.run.parallel, device, cfg.run.mixed_precision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=g.lr,
                                  weight_decay=g.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(g.warmup_steps, g.steps, g.schedule))
    stream = PromptStream(n_train, cfg.run.seed)

    # what each step computed, for the exactness check: the rollout's sample() results and the rewards
    seen: dict[str, list] = {"rollout_tokens": [], "rollout_logprobs": [], "judge": [], "rewards": []}
    rollout_mod, reflection_mod = ps.rollout_mod, ps.reflection_mod

    def capture(mod, name, key, pick):
        fn = getattr(mod, name)

        def w(*a, **kw):
            r = fn(*a, **kw)
            seen[key].append(pick(r))
            return r
        setattr(mod, name, w)

    capture(rollout_mod, "sample", "rollout_tokens", lambda r: _digest(r.completion_ids, r.completion_mask))
    capture(rollout_mod, "sample", "rollout_logprobs", lambda r: _digest(r.logprobs))
    capture(reflection_mod, "sample", "judge", lambda r: _digest(r.completion_ids, r.completion_mask))
    capture(rollout_mod, "compute_rewards", "rewards", lambda r: _digest(r.total))
    saved = ps.install_timers()  # after capture: the timers wrap the capturing functions
    print(TAG + json.dumps({"ready": True, "setup_s": setup_s, "start": start, "threads": torch.get_num_threads(),
                            "emor3": str(Path(emor3.__file__).parent), "cfg_args": extra}), flush=True)
    i = 0
    try:
        for line in sys.stdin:
            if line.strip() != "step":
                break
            for v in seen.values():
                v.clear()
            ps.PH.reset()
            t0 = time.perf_counter()
            m, _ = one_step(stream, policy, reference, optimizer, scheduler, i)
            wall = time.perf_counter() - t0
            assert "time/update" in m, f"step {i + 1} was skipped (no informative group): {m}"
            params = [p for p in model.parameters()]
            rec = {"step": i + 1, "wall_s": wall, "phases_s": ps.breakdown(m, ps.PH.s), "tokens": ps.token_counts(),
                   "digest": {**{k: "".join(v) for k, v in seen.items()},
                              "loss": _digest(torch.tensor([m["loss"], m["grad_norm"]], dtype=torch.float64)),
                              "weights": _digest(*params)},
                   "reward_total": m["reward/total"], "completion_len_mean": m["completion_len_mean"]}
            print(TAG + json.dumps(rec), flush=True)
            i += 1
    finally:
        ps.restore(saved)


# --------------------------------------------------------------------------------------------- driver


class Side:
    def __init__(self, name: str, tree: Path, args, cfg_args: str, work: Path):
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads),
               "MKL_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree), "--model", args.model,
               "--threads", str(args.threads), "--seed", str(args.seed), "--work", str(work), "--cfg-args", cfg_args]
        self.name = name
        work.mkdir(parents=True, exist_ok=True)
        data = Path(args.data_cache) if args.data_cache else Path(args.model).resolve().parents[1] / "emoscenes"
        if data.is_dir() and not (work / "emoscenes").exists():  # the generated EmoScenes, shared read-only
            (work / "emoscenes").symlink_to(data)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(tree))
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
            print(f"  [{self.name}] {line.rstrip()}", flush=True)
        raise RuntimeError(f"{self.name} worker ended (exit {self.proc.wait()})")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def medians(steps: list[dict]) -> dict[str, float]:
    window = steps[2:]  # steps 3..N (1-based)
    return {k: statistics.median(r["phases_s"][k] for r in window) for k in window[0]["phases_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-commit", default="3806520", help="the commit to compare against")
    ap.add_argument("--steps", type=int, default=12, help="GRPO steps per side; medians over steps 3..N")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="/tmp/emor3_profile_step/run/sft",
                    help="a Cold-Start checkpoint folder both sides start from (profile_step's WORK/run/sft)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-cache", default="", help="an EmoScenes cache folder to reuse (default: the one beside "
                    "--model's run folder, when there is one)")
    ap.add_argument("--new-args", default="", help="config flags for the current tree's side only (opt-in settings)")
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default="")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", default="", help=argparse.SUPPRESS)
    ap.add_argument("--cfg-args", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the medians are over steps 3..N)")
    if not (Path(args.model) / "config.json").exists():
        ap.error(f"--model {args.model}: no Cold-Start checkpoint there (run benchmarks/profile_step.py once, or a "
                 "default run, and pass its sft folder)")

    tmp = Path(tempfile.mkdtemp(prefix="emor3_ab_", dir=args.work or None))
    base_tree = tmp / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.baseline_commit],
                   check=True, capture_output=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    sides = {}
    try:
        sides["baseline"] = Side("baseline", base_tree, args, "", tmp / "work-baseline")
        sides["current"] = Side("current", REPO, args, args.new_args, tmp / "work-current")
        for s in sides.values():
            print(f"[ab] {s.name}: setup {s.info['setup_s']:.1f} s, emor3 from {s.info['emor3']}, threads "
                  f"{s.info['threads']}, flags {s.info['cfg_args']}", flush=True)
        load_before = os.getloadavg()
        res = {k: [] for k in sides}
        for i in range(args.steps):
            order = ["baseline", "current"] if i % 2 == 0 else ["current", "baseline"]
            for k in order:
                res[k].append(sides[k].step())
            b, c = res["baseline"][-1], res["current"][-1]
            same = {k: b["digest"][k] == c["digest"][k] for k in b["digest"]}
            print(f"[ab] step {i + 1}: baseline {b['phases_s']['step']:.2f} s, current {c['phases_s']['step']:.2f} s "
                  f"(ratio {b['phases_s']['step'] / c['phases_s']['step']:.2f}); identical: "
                  + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()), flush=True)
        load_after = os.getloadavg()
    finally:
        for s in sides.values():
            s.close()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], capture_output=True)

    med = {k: medians(v) for k, v in res.items()}
    ratio = {p: med["baseline"][p] / med["current"][p] if med["current"][p] > 0 else float("nan")
             for p in med["baseline"]}
    identical = {k: all(b["digest"][k] == c["digest"][k] for b, c in zip(res["baseline"], res["current"]))
                 for k in res["baseline"][0]["digest"]}
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    out = {"what": "bench_step_ab: one default-size GRPO step, baseline commit vs current tree, interleaved",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": model_name, "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "baseline_commit": args.baseline_commit,
           "current_commit": head + ("+dirty" if dirty else ""), "threads": args.threads, "model": args.model,
           "new_args": args.new_args, "load_before": load_before, "load_after": load_after,
           "median_over": f"steps 3..{args.steps}", "median_s": med, "ratio_baseline_over_current": ratio,
           "identical_all_steps": identical, "steps": res,
           "setup": {k: s.info for k, s in sides.items()}}
    print(report(out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


def report(out: dict) -> str:
    mb, mc, r = out["median_s"]["baseline"], out["median_s"]["current"], out["ratio_baseline_over_current"]
    lines = [f"# bench_step_ab: {out['baseline_commit']} vs {out['current_commit']} ({out['new_args'] or 'defaults'}),"
             f" {out['threads']} thread(s), median over {out['median_over']}; load {out['load_before'][0]:.2f} -> "
             f"{out['load_after'][0]:.2f}", "", "| phase | baseline s | current s | ratio |", "|---|---|---|---|"]
    for k in mb:
        name = f"**{k}**" if k in COARSE else k
        lines.append(f"| {name} | {mb[k]:.3f} | {mc[k]:.3f} | {r[k]:.2f} |")
    lines += ["", "identical over all steps: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                         for k, v in out["identical_all_steps"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
