"""Where the sampler's small-row decode spends its time, against the arithmetic it does.

On the EmoSet-shaped workload (see bench_update.py: the "100m" size, 2 prompts of P = 425 with a 448-px image,
G = 8, so 16 rows decode), this runs ``sample`` for 1 token (the prefill and the first draw) and for T tokens, each
under torch.profiler, several times interleaved, and reports per decode step (the difference / (T - 1), best run):
  - the wall time, and how it splits into matmuls (aten::mm / addmm: the linear layers and the lm_head),
    attention (SDPA), and everything else (RoPE, norms, cache writes, sampling);
  - the matmul throughput (GFLOP/s) of a decode step next to the prefill's, per token processed: a decode step
    streams every weight for N tokens, the prefill for B·P tokens.

Then, with ``--stops K`` (K > 0), rows that finish at different lengths: K ordinary token ids are stop ids (on a
random-init model each is drawn about 1/V of the time, so rows stop after geometric lengths), and the rollout of
``--compact-tokens`` tokens is timed with finished rows compacted out of the decode batch and without, both in this
run, interleaved, checked to give the same tokens.

    .venv/bin/python benchmarks/profile_decode.py --threads 1 --stops 600

Shapes: B prompts, G samples per prompt, N = B·G rows, P prompt length, T decode steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_update import make_prompts  # noqa: E402
from emor3.engine.sampler import sample  # noqa: E402
from emor3.models.qwen_vl import QwenVL  # noqa: E402
from emor3.models.sizes import tiny_config  # noqa: E402

GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                        "aten::_efficient_attention_forward", "aten::_flash_attention_forward")}


def profiled(fn) -> tuple[float, dict[str, float]]:
    """Wall seconds of fn() and its self CPU seconds per group of GROUPS plus "other"."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    out = {k: 0.0 for k in (*GROUPS, "other")}
    for ev in prof.key_averages():
        group = next((g for g, names in GROUPS.items() if ev.key in names), "other")
        out[group] += ev.self_cpu_time_total / 1e6
    return wall, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="100m")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=425)
    ap.add_argument("--image-grid", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--stops", type=int, default=0, help="K stop ids for the compaction timing (0: skip it)")
    ap.add_argument("--compact-tokens", type=int, default=96, help="max new tokens of the compaction timing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = tiny_config(args.config)
    torch.manual_seed(0)
    model = QwenVL(cfg).init_weights(0).eval()
    batch = make_prompts(cfg, args.prompts, args.prompt_len, args.image_grid, seed=1, device="cpu")
    B, P = batch.input_ids.shape
    N, T = B * args.group, args.new_tokens
    banned = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]

    def run(tokens: int):
        return lambda: sample(model, batch, group_size=args.group, max_new_tokens=tokens, temperature=1.0,
                              banned_token_ids=banned, generator=0)

    run(2)()  # warm-up
    best = None
    for _ in range(args.repeats):
        w1, g1 = profiled(run(1))
        wT, gT = profiled(run(T))
        step = {k: (gT[k] - g1[k]) / (T - 1) for k in gT}
        res = (w1, (wT - w1) / (T - 1), step, g1)
        best = res if best is None or res[1] < best[1] else best
    prefill_s, step_s, step_split, prefill_split = best
    t = cfg.text
    layer = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim \
        + t.num_attention_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    dec_w = t.num_hidden_layers * layer  # decoder matmul weights
    head_w = t.hidden_size * t.vocab_size
    step_flop = 2 * N * (dec_w + head_w)
    prefill_flop = 2 * B * P * dec_w + 2 * B * head_w  # the prefill's lm_head reads the last position only
    res = {"config": args.config, "threads": torch.get_num_threads(), "rows": N, "prompt_len": P, "new_tokens": T,
           "prefill_s": round(prefill_s, 3), "decode_step_ms": round(step_s * 1e3, 1),
           "decode_split_ms": {k: round(v * 1e3, 1) for k, v in step_split.items()},
           "decode_matmul_gflops": round(step_flop / step_split["matmul"] / 1e9, 1),
           "prefill_matmul_gflops": round(prefill_flop / prefill_split["matmul"] / 1e9, 1),
           "decode_weight_mb_per_step": round((dec_w + head_w) * 4 / 2 ** 20),
           "decode_ms_per_token": round(step_s / N * 1e3, 2), "prefill_ms_per_token": round(prefill_s / (B * P) * 1e3, 2)}
    s = res["decode_split_ms"]
    print(f"{args.config}, {N} rows, P={P}, threads {res['threads']}: decode step {res['decode_step_ms']} ms = matmul "
          f"{s['matmul']} + attention {s['attention']} + other {s['other']} ms; matmul {res['decode_matmul_gflops']} "
          f"GFLOP/s in decode vs {res['prefill_matmul_gflops']} in prefill; {res['decode_ms_per_token']} ms/token "
          f"decoding vs {res['prefill_ms_per_token']} ms/token prefilling (image encode included)")
    print("json", json.dumps(res), flush=True)
    if args.stops:
        compaction(model, batch, args, banned)


def compaction(model, batch, args, banned) -> None:
    stops = list(range(10, 10 + args.stops))  # ordinary ids (the specials sit at the top of the vocabulary)

    def run(compact: bool):
        t0 = time.perf_counter()
        r = sample(model, batch, group_size=args.group, max_new_tokens=args.compact_tokens, temperature=1.0,
                   stop_token_ids=stops, banned_token_ids=banned, generator=0, compact_finished=compact)
        return time.perf_counter() - t0, r

    times = {True: [], False: []}
    outs = {}
    for _ in range(args.repeats):
        for compact in (False, True):
            dt, outs[compact] = run(compact)
            times[compact].append(dt)
    same = torch.equal(outs[True].completion_ids, outs[False].completion_ids)
    gap = float((outs[True].logprobs - outs[False].logprobs).abs().max())
    lengths = outs[True].lengths.tolist()
    res = {"stops": args.stops, "max_new_tokens": args.compact_tokens, "lengths": lengths,
           "decoded_steps": max(lengths), "row_steps_used": sum(lengths),
           "full_s": round(min(times[False]), 2), "compacted_s": round(min(times[True]), 2),
           "ratio": round(min(times[False]) / min(times[True]), 2), "same_tokens": same, "logprob_gap": gap}
    print(f"compaction: {len(lengths)} rows, lengths {sorted(lengths)}: without {res['full_s']} s, with "
          f"{res['compacted_s']} s ({res['ratio']}x); same tokens {same}, log-prob gap {gap:.1e}")
    print("json", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
