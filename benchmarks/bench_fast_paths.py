"""Each faster path of the GRPO step against the code it replaces, at the default run's shapes, in one process.

The two sides of a pair run alternately (``--repeats`` rounds of ``--calls`` calls each); the report gives the
median per call of each side and the ratio. Pairs:
  top_p        judge top-p 0.95 over (113, 957) logits at T = 0.6: ``apply_top_p`` (numpy value sort) vs
               ``_top_p_by_sort`` (torch.sort with indices + scatter), bit-identical results;
  mrope        M-RoPE ids of 123 consistency-judge-shaped prompts (an 8x8-patch image, ~60 text tokens, left
               padded): ``mrope_position_ids`` vs the per-element tensor scan (tests/test_fast_paths.py);
  prompt_rows  backward of the shared-prefix update's prompt-to-rows gather, 8 prompts x 8 rows of (2, 193, 32)
               strided keys, the gradient a slice of the [prompt, own 80] keys' gradient: ``_PromptRows`` vs
               ``index_select``'s autograd backward, bit-identical;
  decode_attn  one decode step's attention, 16 prompts x 8 rows, 4 heads / 2 kv heads of 32, a 193-token prompt
               and 40 generated tokens: ``GroupedKVCache.attend`` (opt-in, not bit-exact) vs SDPA over the prompt
               copied to every row (the default: the cache repeat and the written-prefix window of the sampler).

    .venv/bin/python benchmarks/bench_fast_paths.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from emor3.engine import sampler  # noqa: E402
from emor3.models.positions import mrope_position_ids  # noqa: E402
from emor3.models.qwen_vl import GroupedKVCache, KVCache, _PromptRows  # noqa: E402
from test_fast_paths import mrope_reference  # noqa: E402


def pairs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(113, 957, generator=gen) * 3 / 0.6
    yield "top_p", (lambda: sampler.apply_top_p(logits, 0.95)), (lambda: sampler._top_p_by_sort(logits, 0.95))

    img, P = 90, 130
    ids = torch.randint(0, 80, (123, P), generator=gen)
    mask = torch.ones(123, P, dtype=torch.long)
    for b in range(123):
        pad = int(torch.randint(0, 20, (1,), generator=gen))
        mask[b, :pad] = 0
        ids[b, pad + 5: pad + 21] = img  # 16 merged tokens of an 8x8-patch image
    grid = torch.tensor([[1, 8, 8]]).repeat(123, 1)
    yield ("mrope", lambda: mrope_position_ids(ids, mask, grid, image_token_id=img),
           lambda: mrope_reference(ids, mask, grid, image_token_id=img))

    B, G = 8, 8
    index = torch.arange(B).repeat_interleave(G)
    x = torch.randn(B, 193, 2, 32, generator=gen).transpose(1, 2).requires_grad_(True)  # (B, K, P, hd) strided
    # the gradient reaches the gather through the concatenation [prompt keys, own keys]: a strided slice of it
    grad = torch.randn(B * G, 2, 193 + 80, 32, generator=gen)[:, :, :193]

    def rows_new():
        x.grad = None
        _PromptRows.apply(x, index).backward(grad)

    def rows_old():
        x.grad = None
        x.index_select(0, index).backward(grad)
    yield "prompt_rows", rows_new, rows_old

    B, G, K, H, hd, P, W = 16, 8, 2, 4, 32, 193, 40
    N = B * G
    pk, pv = torch.randn(1, B, K, P + 80, hd, generator=gen), torch.randn(1, B, K, P + 80, hd, generator=gen)
    pmask = torch.ones(B, P + 80, dtype=torch.long)
    pmask[:, :20] = 0
    grouped = GroupedKVCache.from_prefill(KVCache(pk, pv), pmask[:, :P], P, G, 80).window(W)
    full = KVCache(pk.repeat_interleave(G, 1), pv.repeat_interleave(G, 1))
    window = -(-(P + W) // 64) * 64  # the sampler's written-prefix window (64-slot steps)
    attn_mask = pmask.repeat_interleave(G, 0)[:, None, None, :window].bool()
    q = torch.randn(N, H, 1, hd, generator=gen)
    k, v = torch.randn(N, K, 1, hd, generator=gen), torch.randn(N, K, 1, hd, generator=gen)
    pos = torch.tensor([P + W - 1])

    def attn_old():
        full.k[0].index_copy_(2, pos, k)
        full.v[0].index_copy_(2, pos, v)
        return F.scaled_dot_product_attention(q.view(N, K, H // K, hd), full.k[0][:, :, :window],
                                              full.v[0][:, :, :window], attn_mask=attn_mask)
    yield "decode_attn", (lambda: grouped.attend(0, q, k, v, pos)), attn_old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| pair | new ms | old ms | old / new |  (torch {torch.__version__}, {args.threads} thread(s))")
    print("|---|---|---|---|")
    for name, new, old in pairs():
        times = {"new": [], "old": []}
        new(), old()  # warm-up
        for r in range(args.repeats):
            for side, fn in ((("new", new), ("old", old)) if r % 2 == 0 else (("old", old), ("new", new))):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[side].append((time.perf_counter() - t0) / args.calls * 1e3)
        a, b = statistics.median(times["new"]), statistics.median(times["old"])
        print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
