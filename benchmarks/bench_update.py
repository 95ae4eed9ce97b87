"""The GRPO update alone: forward + backward of the completion log-probs, with and without prefix sharing.

Both sides score the same N = B·G completions on the same weights, in one process, interleaved:
  - unshared (the baseline): ``emor3.engine.scoring.completion_logprobs``, N sequences of P + T tokens (each prompt
    run G times through the decoder; its image features are encoded once and copied to the G rows);
  - shared: ``emor3.models.shared_prefix.shared_prefix_logprobs``, each prompt run once, the completions attending
    over their prompt's keys and values.
The loss is the sum of the completion log-probs weighted by a fixed ramp (a stand-in for the policy loss, whose
elementwise cost is negligible), the vision tower trained as in the GRPO loop. The outputs are checked equal before
timing. Reported: best-of-repeats seconds of each, the ratio, and the peak memory of one step of each (CPU: the rise
of the peak RSS over the state before the step, VmHWM reset through /proc/self/clear_refs, with glibc's mmap
threshold fixed at 64 KiB so freed blocks go back to the OS (the script re-executes itself with it set); CUDA:
``torch.cuda.max_memory_allocated`` above the memory in use before the step).

The default workload is EmoSet-shaped: the "100m" size, B = 2 prompts x G = 8 = 16 rows x T = 96 completion
tokens, each prompt one 448 x 448 image (32 x 32 patches, 256 merged tokens) and ~165 text tokens (P = 425, the
second prompt 10 tokens shorter, so left-padded).

    .venv/bin/python benchmarks/bench_update.py --threads 1
    .venv/bin/python benchmarks/bench_update.py --threads 1 --checkpointing

Shapes: B prompts, G samples per prompt, N = B·G rows, P prompt length, T completion length.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emor3.engine.scoring import completion_logprobs  # noqa: E402
from emor3.models.positions import mrope_position_ids  # noqa: E402
from emor3.models.processing import PromptBatch  # noqa: E402
from emor3.models.qwen_vl import QwenVL  # noqa: E402
from emor3.models.shared_prefix import shared_prefix_logprobs  # noqa: E402
from emor3.models.sizes import tiny_config  # noqa: E402

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def make_prompts(cfg, B: int, prompt_len: int, grid_side: int, seed: int, device) -> PromptBatch:
    """B left-padded prompts: 4 text tokens, one grid_side² -patch image, then text up to ``prompt_len`` tokens for
    the first prompt and 10 fewer for each next one."""
    g = torch.Generator().manual_seed(seed)
    img, vs, ve = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    n_text = min(vs, img, cfg.video_token_id, ve)  # ordinary tokens sit below the specials
    k = grid_side * grid_side // cfg.vision.spatial_merge_size ** 2  # merged image tokens
    tail0 = prompt_len - 4 - k - 2
    assert tail0 - 10 * (B - 1) > 0, f"prompt_len {prompt_len} too short for a {k}-token image"
    rows = [torch.randint(0, n_text, (4,), generator=g).tolist() + [vs] + [img] * k + [ve]
            + torch.randint(0, n_text, (tail0 - 10 * b,), generator=g).tolist() for b in range(B)]
    P = max(map(len, rows))
    ids = torch.zeros(B, P, dtype=torch.long)  # (B, P)
    am = torch.zeros(B, P, dtype=torch.long)  # (B, P)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r)
        am[b, P - len(r):] = 1
    grid = torch.tensor([[1, grid_side, grid_side]] * B)  # (B, 3)
    v = cfg.vision
    pix = torch.randn(int(grid.prod(-1).sum()), v.in_channels * v.temporal_patch_size * v.patch_size ** 2,
                      generator=g)  # (patches, C·t·p·p)
    pos, nxt = mrope_position_ids(ids, am, grid, image_token_id=img, spatial_merge_size=v.spatial_merge_size)
    return PromptBatch(ids, am, pos, pix, grid, nxt, [1] * B).to(device)


def step(model, batch, index, ids, mask, shared: bool):
    fn = shared_prefix_logprobs if shared else completion_logprobs
    lp = fn(model, batch, index, ids, mask)  # (N, T)
    w = torch.linspace(-1.0, 1.0, lp.numel(), device=lp.device).view_as(lp)  # (N, T)
    (lp * w * mask).sum().backward()
    return lp.detach()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mb(fn, device) -> float:
    """Peak memory rise of fn() in MB (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak-RSS mark (VmHWM) to the current RSS
    base = _status_kb("VmHWM")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="100m", help="a name from emor3.models.sizes.NAMED")
    ap.add_argument("--prompts", type=int, default=2, help="B")
    ap.add_argument("--group", type=int, default=8, help="G (rows = B·G)")
    ap.add_argument("--completion", type=int, default=96, help="T, completion tokens per row")
    ap.add_argument("--prompt-len", type=int, default=425, help="P of the longest prompt")
    ap.add_argument("--image-grid", type=int, default=32, help="image side in 14-px patches (32: 448 px)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on (both sides)")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps of each after the warm-up (interleaved); the best is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get(_MMAP_ENV) != "65536":  # see the docstring: RSS tracks live memory
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, _MMAP_ENV: "65536"})
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = tiny_config(args.config)
    torch.manual_seed(0)
    model = QwenVL(cfg).init_weights(0).to(dtype=getattr(torch, args.dtype), device=device).train()
    model.set_gradient_checkpointing(args.checkpointing)
    batch = make_prompts(cfg, args.prompts, args.prompt_len, args.image_grid, seed=1, device=device)
    B, G, T = args.prompts, args.group, args.completion
    N = B * G
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, min(cfg.image_token_id, cfg.vision_start_token_id), (N, T), generator=g).to(device)
    mask = torch.ones(N, T, device=device)  # (N, T): every row runs the full length (the update's worst case)
    index = torch.arange(B, device=device).repeat_interleave(G)  # (N,)

    def run(shared: bool) -> tuple[float, Tensor]:
        model.zero_grad(set_to_none=False)  # gradients allocated before each step: both sides hold them alike
        sync(device)
        t0 = time.perf_counter()
        lp = step(model, batch, index, ids, mask, shared)
        sync(device)
        return time.perf_counter() - t0, lp

    # round 0 warms up (allocator, thread pools) and measures peak memory and equality: both sides must compute
    # the same thing, else the timing means nothing; then `repeats` timed rounds, interleaved
    for p in model.parameters():  # allocated up front, so neither side's peak includes creating them
        p.grad = torch.zeros_like(p)
    mem, lps = {}, {}
    for name, shared in (("unshared", False), ("shared", True)):
        mem[name] = peak_mb(lambda s=shared, n=name: lps.__setitem__(n, run(s)[1]), device)
    gap = float((lps["shared"] - lps["unshared"]).abs().max())
    assert gap < (1e-4 if args.dtype == "float32" else 5e-2), f"shared and unshared log-probs differ by {gap}"
    times = {"unshared": [], "shared": []}
    for _ in range(args.repeats):
        times["unshared"].append(run(False)[0])
        times["shared"].append(run(True)[0])
    best = {k: min(v) for k, v in times.items()}
    P = batch.input_ids.shape[1]
    res = {"config": args.config, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
           "checkpointing": args.checkpointing, "prompts": B, "group": G, "rows": N, "prompt_len": P,
           "completion": T, "image_tokens": int((batch.input_ids[0] == cfg.image_token_id).sum()),
           "logprob_gap": gap, "unshared_all_s": [round(t, 2) for t in times["unshared"]],
           "shared_all_s": [round(t, 2) for t in times["shared"]], "unshared_s": round(best["unshared"], 2),
           "shared_s": round(best["shared"], 2), "ratio": round(best["unshared"] / best["shared"], 2),
           "unshared_peak_mb": round(mem["unshared"]), "shared_peak_mb": round(mem["shared"]),
           "decoder_tokens_unshared": N * (P + T), "decoder_tokens_shared": B * P + N * T}
    print(f"torch {torch.__version__}, threads {res['threads']}, device {args.device}, {args.dtype}")
    print(f"{args.config} ({res['params_M']}M params), B={B} x G={G} = {N} rows, P={P} ({res['image_tokens']} image "
          f"tokens), T={T}, checkpointing {args.checkpointing}: unshared {res['unshared_s']} s "
          f"(peak +{res['unshared_peak_mb']} MB) | shared {res['shared_s']} s (peak +{res['shared_peak_mb']} MB) | "
          f"ratio {res['ratio']}x | log-prob gap {gap:.1e}")
    print("json", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
