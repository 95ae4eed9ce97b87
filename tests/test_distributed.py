"""torchrun on CPU (gloo, 2 processes) against the single-process run: same rollouts, loss and global gradient
for the same global batch; a checkpoint written by 2 ranks resumes on 1; a hung rank ends the job with a clear error.

The 2-process runs use FSDP2 (the default --run.parallel), so these tests also pin the loss scaling (normaliser
summed over ranks, backward loss × world size against FSDP's gradient averaging), the gathered-for-sampling
rollout, the sharded reference (β > 0 in the emo_r3 preset) and the full-state checkpoint gather."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emor3.config import parse_args, save_config
from emor3.checkpoints import latest_checkpoint
from emor3.grpo.train import train
from emor3.models import load_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import tiny_config  # noqa: E402  (the TINY run settings, shared)

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
import os, time

def length_reward(prompts, completions, **kw):
    """Varies within every group, so advantages are non-zero and every parameter gets a gradient."""
    return [len(c) / 100.0 for c in completions]

_calls = [0]

def hang_on_rank1(prompts, completions, **kw):
    """Rank 1 stops answering (a stuck data loader, a dead NFS mount...) in its second rollout chunk."""
    _calls[0] += 1
    if os.environ.get("RANK") == "1" and _calls[0] == 2:
        time.sleep(float(os.environ["EMOR3_TEST_HANG_S"]))
    return [len(c) / 100.0 for c in completions]
'''

# 4 prompts x 2 samples per step: 2 prompts per rank; micro-batches of 2 prompts, so the single process runs two
# micro-batches where each rank runs one (the accumulation and the cross-rank sum must agree).
# sample_chunk 1: each prompt sampled under its own seeded generator, so rollouts do not depend on the ranks
GRPO = {"prompts_per_step": 4, "mini_batch_prompts": 4, "micro_batch_rows": 4, "sample_chunk": 1,
        "loss_scope": "mini-batch"}  # one token count over the mini-batch and its ranks


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "emor3_dist_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(d))
    return d


def _config(tmp_path: Path, name: str, steps: int, plugin: str = "length_reward", model: str = "", **run):
    cfg = tiny_config(tmp_path, grpo={**GRPO, "steps": steps}, sft={"steps": 0}, model={"path": model},
                      data={"emoscenes_test": 2, "emoscenes_ood": 1},  # the evaluation tables are not under test
                      # the tiny model's choices whether it is built here (model "") or given by path
                      reward={"plugins": [f"emor3_dist_plugin:{plugin}=1.0"], "judge_max_new_tokens": 8,
                              "missing_step": "neutral"},
                      run={"out": str(tmp_path / name), "dist_timeout": 60.0, **run})
    return cfg


def _torchrun(cfg, plugin_dir: Path, *extra: str, timeout: float = 300, env: dict | None = None):
    path = Path(cfg.run.out + ".toml")
    save_config(cfg, path)
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(REPO)]), "OMP_NUM_THREADS": "1",
               **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "emor3.grpo.train", "--config", str(path), *extra]
    return subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _params(out: Path) -> dict[str, torch.Tensor]:
    return dict(load_pretrained(latest_checkpoint(out) / "model").state_dict())


def _adam_moment(out: Path) -> dict[str, torch.Tensor]:
    """AdamW's first moment m_t from the run's checkpoint (keyed by parameter name at any world size)."""
    state = torch.load(latest_checkpoint(out) / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    return {k: v["exp_avg"] for k, v in state.items()}


def _adam_step_bound(t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """Largest |m̂_t / sqrt(v̂_t)| any gradient sequence can give at step t (AdamW's update is lr times it).

    m̂_t = sum_i w_i g_i and v̂_t = sum_i u_i g_i^2 with w_i = (1-b1) b1^(t-i) / (1-b1^t), u_i = (1-b2) b2^(t-i) /
    (1-b2^t); by Cauchy-Schwarz |sum w_i g_i| <= sqrt(sum w_i^2/u_i) sqrt(sum u_i g_i^2). At t = 1 it is exactly 1
    (the update is lr * sign(g)), at t = 2 it is 1.0014."""
    w = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1**t) for i in range(1, t + 1)]
    u = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2**t) for i in range(1, t + 1)]
    return sum(wi * wi / ui for wi, ui in zip(w, u)) ** 0.5


def _assert_same_gradient(a: Path, b: Path, what: str):
    """The global gradient of the same mini-batch, from the same parameters and optimizer state, on 1 and 2 ranks.

    m_t = b1 m_(t-1) + (1-b1) clip(g_t), with m_(t-1) equal on both sides, so comparing m_t compares the clipped
    global gradient. Both sides sum the same per-token terms of the same two micro-batches (one process accumulates
    both in .grad; each rank computes one and FSDP's reduce-scatter averages 2·a and 2·b); only the order of fp32
    additions and matmul blocking differ, an error of a few fp32 epsilons (1.2e-7) times the summed magnitudes. We
    allow 1e-4 of the largest moment: ~1000 epsilons of headroom, while a gradient missing the other rank's share,
    or scaled by W or 1/W, is off by a large fraction of it."""
    ma, mb = _adam_moment(a), _adam_moment(b)
    assert ma.keys() == mb.keys() and ma, f"{what}: optimizer states hold different parameters"
    scale = max(float(v.abs().max()) for v in ma.values())
    worst = max((float((ma[k] - mb[k]).abs().max()), k) for k in ma)
    assert scale > 0 and worst[0] <= 1e-4 * scale, \
        f"{what}: gradients differ by {worst[0]:.2e} (largest moment {scale:.2e}) in {worst[1]}: not the global one"


def _assert_same_metrics(ma: list[dict], mb: list[dict], what: str):
    assert [r["step"] for r in ma] == [r["step"] for r in mb], what
    for ra, rb in zip(ma, mb):
        # rewards equal exactly: the rollouts (sampled per prompt chunk from seeded generators) are the same texts
        assert ra["reward/total"] == pytest.approx(rb["reward/total"], abs=1e-6), \
            f"{what}: rollouts differ at step {ra['step']} (sampling seeds depend on the rank layout)"
        for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "advantage_abs_mean", "completion_len_mean"):
            assert abs(ra[k] - rb[k]) <= 1e-5, f"{what}: {k} at step {ra['step']}: {ra[k]} vs {rb[k]}"


def _assert_close_parameters(a: Path, b: Path, lr: float, steps: int, what: str):
    """End to end: parameters after ``steps`` AdamW steps from the same start.

    AdamW's update is lr · m̂/(sqrt(v̂)+eps) (+ decoupled weight decay, which only shrinks a difference), and
    |m̂/sqrt(v̂)| <= ``_adam_step_bound(t)`` whatever the gradients. Near-zero gradient elements whose sign flips
    under fp32 rounding really do move by ±lr on either side, so the only sound bound on the parameter difference
    is 2·lr·sum_t bound(t); the gradients themselves are compared by ``_assert_same_gradient``."""
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    tol = 2 * lr * sum(_adam_step_bound(t) for t in range(1, steps + 1)) * 1.001  # 1.001: fp32 rounding of lr·bound
    worst = max((float((pa[k] - pb[k]).abs().max()), k) for k in pa)
    assert worst[0] <= tol, f"{what}: parameters differ by {worst[0]:.2e} > {tol:.2e} in {worst[1]}"
    init = dict(load_pretrained(a.parent / "single" / "init").state_dict())
    moved = sum(not torch.equal(init[k], pa[k]) for k in pa)
    assert moved == len(pa), "the comparison is vacuous unless every parameter moved"


def test_two_ranks_equal_one_rank_and_resume_on_one(tmp_path, plugin_dir):
    # step 1 from the same start: one process (the reference) and two ranks, the same global batch of 4 prompts
    single = _config(tmp_path, "single", steps=1)
    train(single)
    init = str(Path(single.run.out) / "init")  # the same tiny model and tokenizer, built once
    half = _config(tmp_path, "half", steps=1, model=init)
    proc = _torchrun(half, plugin_dir)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    state = torch.load(latest_checkpoint(Path(half.run.out)) / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and all(isinstance(k, str) for k in state["optimizer"]["state"]), \
        "the optimizer state must be keyed by parameter name to load at another world size"
    _assert_same_gradient(Path(single.run.out), Path(half.run.out), "step 1, 2 processes vs 1")
    _assert_same_metrics(_metrics(Path(single.run.out)), _metrics(Path(half.run.out)), "step 1, 2 processes vs 1")

    # two steps in one go on two ranks
    two = _config(tmp_path, "two", steps=2, model=init)
    proc = _torchrun(two, plugin_dir)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("| emo_r3 |") == 1, "only rank 0 evaluates and prints the table"
    assert not list(Path(two.run.out).glob(".checkpoint-*.tmp")), "no temporary checkpoint folder is left"

    # the 2-rank checkpoint after step 1, resumed on 1 process for step 2: it starts step 2 from exactly the state
    # the 2-rank run had (both ran the same step 1), so step 2's gradient is compared at rounding tolerance
    train(parse_args(["--resume", half.run.out, "--grpo.steps", "2"], "test", ""))
    _assert_same_gradient(Path(two.run.out), Path(half.run.out), "step 2, 2-rank checkpoint resumed on 1 process")
    _assert_same_metrics(_metrics(Path(two.run.out)), _metrics(Path(half.run.out)), "2-rank checkpoint resumed on 1")

    # end to end: 2 steps on 2 ranks vs 2 steps on 1 process (1 + resume + 1, bit-exact with 2 in one go:
    # tests/test_train.py::test_resume_is_bit_exact)
    train(parse_args(["--resume", single.run.out, "--grpo.steps", "2"], "test", ""))
    lr = single.grpo.lr
    _assert_close_parameters(Path(single.run.out), Path(two.run.out), lr, 2, "2 processes vs 1")
    _assert_close_parameters(Path(single.run.out), Path(half.run.out), lr, 2, "2-rank checkpoint resumed on 1")


def test_hung_rank_ends_the_job_with_a_clear_error(tmp_path, plugin_dir):
    cfg = _config(tmp_path, "hang", steps=2, plugin="hang_on_rank1", dist_timeout=4.0)
    # rank 1 hangs 15 s, longer than the 4 s timeout: a job that ended without the timeout's error would have
    # waited for it and finished cleanly
    proc = _torchrun(cfg, plugin_dir, timeout=240, env={"EMOR3_TEST_HANG_S": "15"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, "a rank that stops answering must fail the job"
    assert "DistributedError" in output and "rank 0/2" in output and "--run.dist-timeout=4s" in output, \
        f"the error must say which rank gave up, why and which setting controls it:\n{output[-4000:]}"
