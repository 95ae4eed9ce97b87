"""Benchmark emor3.models.QwenVL against transformers' Qwen2_5_VLForConditionalGeneration (same weights, same run);
with `--arch qwen3_vl`, emor3.models.Qwen3VL against Qwen3VLForConditionalGeneration.

1. Speed: forward + backward of a GRPO-sized batch (B prompts x G samples, one 112x112 image per prompt, prompt +
   completion tokens), loss = sum of completion-token log-probs. Both models encode every row's image (identical
   work; our sampler/trainer can additionally encode once per prompt, not counted here). Median of `--repeats`.
   Baseline: transformers' model(...).logits -> log_softmax -> gather (what TRL's GRPOTrainer does).
2. Memory: peak resident memory of one log-prob forward+backward at a 32k vocabulary, ours (`logprobs`, chunked)
   vs the full-logits way (logits (N, L, V) -> log_softmax -> gather), each in a fresh subprocess, measured as
   the rise of the peak RSS (VmHWM, reset via /proc/self/clear_refs) over the state after building model and
   inputs (Linux only).

Run: .venv/bin/python benchmarks/bench_model.py [--repeats 5] [--arch qwen2_5_vl|qwen3_vl] [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emor3.models import Qwen3VL, QwenVL  # noqa: E402
from emor3.models.positions import mrope_position_ids  # noqa: E402
from emor3.models.sizes import make_config, make_qwen3_config  # noqa: E402

ARCH = "qwen2_5_vl"  # set from --arch in main()


def build(vocab: int, hidden: int, layers: int):
    if ARCH == "qwen3_vl":  # the same sizes; vision without windows, DeepStack from blocks 0 and 2
        cfg = make_qwen3_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                                num_layers=layers, num_heads=hidden // 64, num_kv_heads=2, head_dim=64,
                                vision_depth=4, vision_hidden=256, vision_heads=4, vision_intermediate=512,
                                deepstack_visual_indexes=(0, 2), num_position_embeddings=256,
                                tie_word_embeddings=False)
        model_cls = Qwen3VL
    else:
        cfg = make_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_layers=layers,
                          num_heads=hidden // 64, num_kv_heads=2, vision_depth=4, vision_hidden=256, vision_heads=4,
                          vision_intermediate=512, fullatt_block_indexes=(3,), window_size=56,
                          tie_word_embeddings=False)
        model_cls = QwenVL
    torch.manual_seed(0)
    ours = model_cls(cfg).init_weights(0).train()
    return cfg, ours


def to_hf(cfg, ours):
    import transformers

    conf_cls, model_cls = ((transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration)
                           if ARCH == "qwen3_vl" else
                           (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration))
    hfc = conf_cls(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    hfc._attn_implementation = "sdpa"
    hf = model_cls(hfc).train()
    sd = {("model.language_model." + k[6:] if k.startswith("model.") else
           "model." + k if k.startswith("visual.") else k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def batch(cfg, N: int, prompt_text: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_img = 16  # 112x112 -> 8x8 patches -> 16 merged tokens
    prompt = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
    rows = []
    for i in range(N):
        text = torch.randint(0, cfg.text.vocab_size - 20, (prompt_text - (i % 4) * 3,), generator=g).tolist()
        comp = torch.randint(0, cfg.text.vocab_size - 20, (T,), generator=g).tolist()
        rows.append(prompt + text + comp)
    L = max(map(len, rows))
    ids = torch.zeros(N, L, dtype=torch.long)
    am = torch.zeros(N, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        am[i, L - len(r):] = 1
    grid = torch.tensor([[1, 8, 8]] * N)
    p = cfg.vision.patch_size  # 14 (Qwen2.5-VL) or 16 (Qwen3-VL): 8x8 patches either way
    pix = torch.randn(N * 64, 3 * 2 * p * p, generator=g)  # (N * 64, C*t*p*p)
    pos, _ = mrope_position_ids(ids, am, grid, image_token_id=cfg.image_token_id)
    return ids, am, pos, pix, grid


def ours_step(m, ids, am, pos, pix, grid, T):
    lp = m.logprobs(ids, pos, am, T, image_embeds=m.encode_images(pix, grid))
    lp.sum().backward()
    return lp.detach()


def full_logits_step(m, ids, am, pos, pix, grid, T, hf: bool):
    if hf:
        logits = m(input_ids=ids, attention_mask=am, position_ids=pos, pixel_values=pix, image_grid_thw=grid).logits
    else:
        logits = m.logits(m(ids, pos, am, image_embeds=m.encode_images(pix, grid)))
    lp = torch.log_softmax(logits[:, -T - 1:-1].float(), -1).gather(-1, ids[:, -T:, None]).squeeze(-1)
    lp.sum().backward()
    return lp.detach()


def timeit(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def speed(args):
    cfg, ours = build(args.vocab, args.hidden, args.layers)
    hf = to_hf(cfg, ours)
    data = batch(cfg, args.rows, args.prompt_text, args.T)
    a = ours_step(ours, *data, args.T)
    ours.zero_grad()
    b = full_logits_step(hf, *data, args.T, hf=True)
    hf.zero_grad()
    assert (a - b).abs().max() < 1e-3, "the two models disagree; timing would be meaningless"

    def run_ours():
        ours.zero_grad(set_to_none=True)
        ours_step(ours, *data, args.T)

    def run_hf():
        hf.zero_grad(set_to_none=True)
        full_logits_step(hf, *data, args.T, hf=True)

    t_hf, t_ours = timeit(run_hf, args.repeats), timeit(run_ours, args.repeats)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"speed ({ARCH}): {n_params / 1e6:.1f}M params, N={args.rows} rows x L={data[0].shape[1]} tokens, "
          f"T={args.T}, "
          f"V={args.vocab}, threads={torch.get_num_threads()}")
    print(f"  transformers fwd+bwd {t_hf * 1e3:.0f} ms | ours {t_ours * 1e3:.0f} ms | speed-up {t_hf / t_ours:.2f}x")


def memory_child(args):
    cfg, ours = build(args.vocab, args.hidden, args.layers)
    data = batch(cfg, args.rows, args.prompt_text, args.T)
    # warm up library state (thread pools, kernels, lazy imports) on a tiny batch, then return freed memory to
    # the OS so that the measured rise is this step's working set only
    way, part = args.child.split(":")
    if part == "step":  # the whole log-prob step: vision + decoder + head, forward and backward
        step = ours_step if way == "ours" else (lambda *a: full_logits_step(*a, hf=False))
    else:  # the head only, from given hidden states (N, T, D): where the two ways differ
        def step(m, ids, am, pos, pix, grid, T):
            h = torch.randn(ids.shape[0], T, m.config.text.hidden_size, requires_grad=True)
            if way == "ours":
                lp = m.logprobs_from_hidden(h, ids[:, -T:])
            else:
                lp = torch.log_softmax(m.logits(h).float(), -1).gather(-1, ids[:, -T:, None]).squeeze(-1)
            lp.sum().backward()
    step(ours, *batch(cfg, 1, 4, 4), 4)
    ours.zero_grad(set_to_none=False)  # grads allocated before measuring: both ways hold them alike
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak-RSS mark (VmHWM) to the current RSS
    base = _status_kb("VmHWM")
    step(ours, *data, args.T)
    peak = _status_kb("VmHWM")
    print(json.dumps({"rise_mb": (peak - base) / 1024}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory(args):
    # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, which makes RSS track the
    # allocation history rather than live memory; a fixed 64 KiB threshold returns big blocks to the OS at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    N, T, V = args.rows, args.T, args.vocab
    print(f"memory: N={N}, T={T}, V={V}: one (N,T,V) fp32 tensor = {N * T * V * 4 / 2**20:.0f} MB")
    for part in ("head", "step"):
        res = {}
        for way in ("full", "ours"):
            cmd = [sys.executable, __file__, "--child", f"{way}:{part}"] + [
                f"--{k}={getattr(args, k)}" for k in ("vocab", "hidden", "layers", "rows", "prompt_text", "T",
                                                      "arch", "threads")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            res[way] = json.loads(out.strip().splitlines()[-1])["rise_mb"]
        print(f"  {part:4s} peak RSS rise: full-logits {res['full']:.0f} MB | ours (chunked logprobs) "
              f"{res['ours']:.0f} MB | ratio {res['ours'] / res['full']:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8)  # B=2 prompts x G=4
    ap.add_argument("--prompt_text", type=int, default=48)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--child", default=None)
    ap.add_argument("--skip_speed", action="store_true")
    ap.add_argument("--arch", default="qwen2_5_vl", choices=("qwen2_5_vl", "qwen3_vl"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    global ARCH
    ARCH = args.arch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return memory_child(args)
    if not args.skip_speed:
        speed(args)
    memory(args)


if __name__ == "__main__":
    main()
