"""Rollout throughput: emor3's ``sample`` against transformers' ``generate`` on the same weights and prompts.

Both sides: B prompts (each with one image and text of a different length, left-padded) × G samples = N rows,
exactly ``--new-tokens`` generated tokens per row (no stop ids, so every row runs the full length), temperature 1,
no top-k / top-p, the vision special tokens suppressed. The baseline is what TRL's GRPOTrainer does without vLLM:
``Qwen2_5_VLForConditionalGeneration.generate(..., do_sample=True, num_return_sequences=G)`` (dynamic cache; inputs
expanded G times before prefill, so every prompt and image is processed G times). The transformers model is loaded
with ``from_pretrained`` from a folder written by emor3's ``save_pretrained``, so the weights are identical.

Reported per config: wall seconds and generated tokens/s of each, the ratio, the KV-cache bytes per token
(layers · 2 · kv_heads · head_dim · bytes per element) and the peak memory of each side's first timed rollout
(CPU: the rise of the peak RSS over the state before it, VmHWM reset through /proc/self/clear_refs, with glibc's mmap
threshold fixed at 64 KiB so freed blocks go back to the OS, as in bench_update.py; CUDA:
``torch.cuda.max_memory_allocated`` above the memory in use before it). ``--compile`` adds a run of
``sample(compile=True)`` (its compile time reported separately, after one warm-up rollout).

The config "emoset" is the EmoSet-shaped workload of bench_update.py: the "100m" size, B = 2 prompts x G = 8 = 16
rows x 96 new tokens, each prompt one 448 x 448 image (32 x 32 patches, 256 merged tokens) and text up to P = 425
(``bench_update.make_prompts``); it ignores --prompts, --group, --new-tokens and --image-grid.

    .venv/bin/python benchmarks/bench_sampler.py                       # CPU: tiny and 100m, fp32
    .venv/bin/python benchmarks/bench_sampler.py --configs emoset --threads 1 --repeats 2
    .venv/bin/python benchmarks/bench_sampler.py --configs tiny --compile
    benchmarks/gpu_sampler.sh                                          # GPU: bf16, with and without compile

Shapes: B prompts, G samples per prompt, N = B·G rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_update import _MMAP_ENV, make_prompts, peak_mb  # noqa: E402
from emor3.engine.sampler import sample
from emor3.models.checkpoint import save_pretrained
from emor3.models.positions import mrope_position_ids
from emor3.models.processing import PromptBatch
from emor3.models.qwen_vl import QwenVL
from emor3.models.sizes import tiny_config

# the EmoSet-shaped workload (bench_update.py's default): model size, B, G, new tokens, image side in patches, P
EMOSET = dict(size="100m", prompts=2, group=8, new_tokens=96, image_grid=32, prompt_len=425)


def make_batch(cfg, B: int, seed: int, device, grid_side: int = 8) -> PromptBatch:
    """B left-padded prompts: 4 text tokens, one grid_side² -patch image (grid_side²/4 merged tokens), then
    5, 8, 11, ... text tokens (so the prompts have different lengths and are left-padded)."""
    g = torch.Generator().manual_seed(seed)
    img, vs, ve = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    n_text = min(vs, cfg.image_token_id, cfg.video_token_id, ve)  # ordinary tokens sit below the specials
    rows, grids = [], []
    for b in range(B):
        grid = (1, grid_side, grid_side)
        k = grid[0] * grid[1] * grid[2] // cfg.vision.spatial_merge_size**2
        head = torch.randint(0, n_text, (4,), generator=g).tolist()
        tail = torch.randint(0, n_text, (5 + 3 * b,), generator=g).tolist()
        rows.append(head + [vs] + [img] * k + [ve] + tail)
        grids.append(grid)
    P = max(map(len, rows))
    ids = torch.zeros(B, P, dtype=torch.long)  # (B, P)
    am = torch.zeros(B, P, dtype=torch.long)  # (B, P)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r)
        am[b, P - len(r):] = 1
    grid_t = torch.tensor(grids)  # (B, 3)
    v = cfg.vision
    pix = torch.randn(int(grid_t.prod(-1).sum()), v.in_channels * v.temporal_patch_size * v.patch_size**2,
                      generator=g)  # (patches, C·t·p·p)
    pos, nxt = mrope_position_ids(ids, am, grid_t, image_token_id=img, spatial_merge_size=v.spatial_merge_size)
    return PromptBatch(ids, am, pos, pix, grid_t, nxt, [1] * B).to(device)


def banned_ids(cfg) -> list[int]:
    return [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]


def run_ours(model, batch, args, compile=False) -> tuple[float, int]:
    sync(args.device)
    t0 = time.perf_counter()
    r = sample(model, batch, group_size=args.group, max_new_tokens=args.new_tokens, temperature=1.0,
               stop_token_ids=(), banned_token_ids=banned_ids(model.config), generator=0, compile=compile)
    sync(args.device)
    dt = time.perf_counter() - t0
    assert r.completion_ids.shape == (batch.input_ids.shape[0] * args.group, args.new_tokens)
    return dt, int(r.completion_mask.sum())


def run_hf(hf, batch, args, cfg) -> tuple[float, int]:
    sync(args.device)
    t0 = time.perf_counter()
    out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                      mm_token_type_ids=(batch.input_ids == cfg.image_token_id).int(),
                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.group,
                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                      suppress_tokens=banned_ids(cfg), eos_token_id=None, pad_token_id=0)
    sync(args.device)
    dt = time.perf_counter() - t0
    new = out.shape[1] - batch.input_ids.shape[1]
    assert out.shape[0] == batch.input_ids.shape[0] * args.group and new == args.new_tokens, out.shape
    return dt, out.shape[0] * new


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_config(name: str, args) -> dict:
    import transformers

    emoset = name == "emoset"
    if emoset:
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in EMOSET.items() if k != "size"}})
    dtype = getattr(torch, args.dtype)
    cfg = tiny_config(EMOSET["size"] if emoset else name)
    torch.manual_seed(0)
    model = QwenVL(cfg).init_weights(0).to(dtype=dtype, device=args.device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=dtype).to(args.device).eval()
    if emoset:
        batch = make_prompts(cfg, args.prompts, args.prompt_len, args.image_grid, seed=1, device=args.device)
    else:
        batch = make_batch(cfg, args.prompts, seed=1, device=args.device, grid_side=args.image_grid)
    t = cfg.text
    kv_bytes = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * torch.finfo(dtype).bits // 8

    # warm-up both (allocator, thread pools, lazy inits) with a short rollout
    short = argparse.Namespace(**{**vars(args), "new_tokens": 4})
    run_ours(model, batch, short)
    run_hf(hf, batch, short, cfg)

    res = {"config": name, "params_M": round(n_params / 1e6, 1), "device": args.device, "dtype": args.dtype,
           "rows": args.prompts * args.group, "new_tokens": args.new_tokens, "kv_bytes_per_token": kv_bytes,
           "prompt_len": batch.input_ids.shape[1]}
    # interleaved repeats, best of each: the CPU is shared, so the minimum is the least-disturbed measurement;
    # the first repeat of each also gives its peak memory
    hf_runs, ours_runs, peak = [], [], {}
    device = torch.device(args.device)
    for i in range(args.repeats):
        if i == 0:
            peak["hf"] = peak_mb(lambda: hf_runs.append(run_hf(hf, batch, args, cfg)), device)
            peak["ours"] = peak_mb(lambda: ours_runs.append(run_ours(model, batch, args)), device)
            continue
        hf_runs.append(run_hf(hf, batch, args, cfg))
        ours_runs.append(run_ours(model, batch, args))
    (hf_s, hf_tok), (ours_s, ours_tok) = min(hf_runs), min(ours_runs)
    res.update(hf_all_s=[round(r[0], 2) for r in hf_runs], ours_all_s=[round(r[0], 2) for r in ours_runs])
    res.update(hf_s=round(hf_s, 2), hf_tok_s=round(hf_tok / hf_s, 1), ours_s=round(ours_s, 2),
               ours_tok_s=round(ours_tok / ours_s, 1), ratio=round(hf_s / ours_s, 2),
               hf_peak_mb=round(peak["hf"]), ours_peak_mb=round(peak["ours"]))
    if args.compile:
        t0 = time.perf_counter()
        run_ours(model, batch, args, compile=True)  # first call compiles
        res["compile_first_call_s"] = round(time.perf_counter() - t0, 1)
        c_s, c_tok = min(run_ours(model, batch, args, compile=True) for _ in range(args.repeats))
        res.update(compiled_s=round(c_s, 2), compiled_tok_s=round(c_tok / c_s, 1), compiled_ratio=round(hf_s / c_s, 2))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,100m", help="comma-separated names from emor3.models.sizes.NAMED, or "
                    "emoset (the EmoSet-shaped workload, see the docstring)")
    ap.add_argument("--prompts", type=int, default=8, help="B")
    ap.add_argument("--group", type=int, default=8, help="G (rows = B·G)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--image-grid", type=int, default=8, help="image side in 14-px patches (8: 112 px, 16 merged "
                    "tokens; 16: 224 px, 64 merged tokens, closer to an EmoSet prompt)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true", help="also time sample(compile=True)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each (interleaved); the best is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.device == "cpu" and os.environ.get(_MMAP_ENV) != "65536":  # see the docstring: RSS tracks live memory
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, _MMAP_ENV: "65536"})
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    for name in args.configs.split(","):
        res = bench_config(name, args)
        line = (f"{name:>6} ({res['params_M']}M params, {res['rows']} rows x {res['new_tokens']} tokens, "
                f"prompt {res['prompt_len']}): generate {res['hf_s']} s ({res['hf_tok_s']} tok/s), "
                f"sample {res['ours_s']} s ({res['ours_tok_s']} tok/s), ratio {res['ratio']}x")
        if args.compile:
            line += (f"; compiled {res['compiled_s']} s ({res['compiled_tok_s']} tok/s, ratio {res['compiled_ratio']}x,"
                     f" first call {res['compile_first_call_s']} s)")
        line += (f"; peak +{res['hf_peak_mb']} MB (generate) / +{res['ours_peak_mb']} MB (sample); "
                 f"KV cache {res['kv_bytes_per_token']} B/token")
        print(line, flush=True)
        print("json", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
