"""The RER consistency judge with and without shared prefixes: `ModelJudge(share_prefix=True)` vs `False`.

Workload (EmoSet-shaped, as bench_update's): B prompts x G completions, each prompt one 448 x 448 image (256 merged
tokens); the judge asks, for every completion, "Can the following text describe the image? ..." followed by that
completion's step 1 (seeded sentences of 8 to 40 words, so the requests are left-padded to different lengths).
Both sides run the same `ModelJudge` calls on the same weights, in one process, interleaved:
  - unshared (the baseline, `share_prefix=False`): each of the N = B·G requests encoded whole, its image encoded by
    the vision tower and its whole prompt prefilled, N times per batch;
  - shared (`share_prefix=True`, the default): each prompt's header + image + question prefilled once (the image
    encoded once), then only each request's step 1 and the assistant header.
Two judge calls per side: sample mode (`generate`, the paper's: one reply of up to --new-tokens at T = 0.6,
top-p 0.95; the random-init model never stops early, so every row decodes the full length) and logprob mode
(`choice_logprobs` of Yes / yes / No / no). Before timing, the two sides are checked to compute the same thing:
choice log-probs within 1e-4, greedy replies (T = 0) identical, and the sampled replies compared (counted, not
asserted: the two sides' logits differ by float rounding, ~1e-6, and a random-init model's near-uniform 32k-way
distribution puts some of the 16 x 32 inverse-CDF draws that close to a boundary between adjacent token ids; a
trained model's peaked distribution rarely does). The processor (tokenising and image preprocessing of all N
requests) runs on both sides and is timed alone too. Peak memory as bench_update (the rise of the peak RSS during the call; CUDA: max allocated).

The model is the "100m" size (random init) with a 32k byte-level BPE trained here on a seeded corpus, so the
vocabulary (the lm_head's cost) is the size's own.

    .venv/bin/python benchmarks/bench_judge.py --threads 1
    .venv/bin/python benchmarks/bench_judge.py --threads 1 --config tiny

Shapes: B prompts, G completions per prompt, N = B·G judge requests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_update import peak_mb, sync  # noqa: E402

from emor3.models.processing import Processor  # noqa: E402
from emor3.models.qwen_vl import QwenVL  # noqa: E402
from emor3.models.sizes import NAMED, tiny_config  # noqa: E402
from emor3.toy.model import build_tiny_tokenizer, write_preprocessor_config  # noqa: E402
from emor3.rewards.reflection import CONSISTENCY_QUESTION, ModelJudge, consistency_request  # noqa: E402

WORDS = ("a girl laughs at small puppy in the park on sunny day dark alley night rain window crowd cheers while "
         "fireworks light sky above stadium old man sits alone bench empty street wet lamp glows soft warm yellow "
         "children play near river boat drifts slowly under grey clouds storm gathers over fields").split()


def step1_texts(n: int, seed: int) -> list[str]:
    """n seeded step-1 sentences of 8 to 40 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))).capitalize() + "." for _ in range(n)]


def build(config: str, image_px: int, out_dir: str):
    """A random-init model of size `config` and a Processor whose tokenizer has the size's vocabulary."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    junk = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 10))) for _ in range(60000)]
    corpus = [" ".join(junk[i:i + 50]) for i in range(0, len(junk), 50)]
    corpus += [CONSISTENCY_QUESTION + " Yes No yes no. " + " ".join(WORDS)] * 50
    tok = build_tiny_tokenizer(corpus, NAMED[config]["vocab_size"], out_dir)
    cfg = tiny_config(config, vocab_size=len(tok), special_token_base=tok.convert_tokens_to_ids("<|endoftext|>"))
    m = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    write_preprocessor_config(out_dir, min_pixels=4 * m * m, max_pixels=image_px * image_px,
                              patch_size=cfg.vision.patch_size, merge_size=cfg.vision.spatial_merge_size)
    torch.manual_seed(0)
    return QwenVL(cfg).init_weights(0).eval(), Processor.from_pretrained(out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="100m", help="a name from emor3.models.sizes.NAMED")
    ap.add_argument("--prompts", type=int, default=2, help="B")
    ap.add_argument("--group", type=int, default=8, help="G (requests = B·G)")
    ap.add_argument("--image-px", type=int, default=448, help="image side in pixels")
    ap.add_argument("--new-tokens", type=int, default=32, help="longest sampled reply (the judge's default)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds after the checking one; best reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # as bench_update
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image

    model, proc = build(args.config, args.image_px, tempfile.mkdtemp())
    model = model.to(device)
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(args.image_px, args.image_px, 3, generator=g) * 255).to(torch.uint8)
                              .numpy()) for _ in range(args.prompts)]
    B, G = args.prompts, args.group
    texts = step1_texts(B * G, seed=2)
    reqs = [consistency_request(texts[b * G + j], images[b]) for b in range(B) for j in range(G)]  # (N,)
    yes_no = ["Yes", "yes", "No", "no"]

    def call(mode: str, shared: bool):
        judge = ModelJudge(model, proc, max_new_tokens=args.new_tokens, seed=0, share_prefix=shared,
                           **({"temperature": 0.0} if mode == "greedy" else {}))
        if mode in ("sample", "greedy"):
            return judge.generate(reqs)
        return torch.stack(judge.choice_logprobs(reqs, [yes_no] * len(reqs)))  # (N, 4)

    def timed(mode: str, shared: bool) -> float:
        sync(device)
        t0 = time.perf_counter()
        call(mode, shared)
        sync(device)
        return time.perf_counter() - t0

    sides = (("unshared", False), ("shared", True))
    # round 0 checks that both sides compute the same thing and measures peak memory; then timed rounds, interleaved
    out, mem = {}, {}
    for mode in ("sample", "logprob"):
        for name, shared in sides:
            mem[mode, name] = peak_mb(lambda m=mode, s=shared, n=name: out.__setitem__((m, n), call(m, s)), device)
    same_replies = sum(a == b for a, b in zip(out["sample", "unshared"], out["sample", "shared"]))
    greedy = [call("greedy", s) for _, s in sides]
    assert greedy[0] == greedy[1], "shared and unshared greedy judges gave different replies"
    gap = float((out["logprob", "unshared"] - out["logprob", "shared"]).abs().max())
    assert gap < 1e-4, f"shared and unshared choice log-probs differ by {gap}"
    times = {(m, n): [] for m in ("sample", "logprob") for n, _ in sides}
    for _ in range(args.repeats):
        for mode in ("sample", "logprob"):
            for name, shared in sides:
                times[mode, name].append(timed(mode, shared))
    t0 = time.perf_counter()
    full = ModelJudge(model, proc, share_prefix=False).encode(reqs)
    encode_s = time.perf_counter() - t0
    P = full.input_ids.shape[1]
    lens = full.attention_mask.sum(-1)
    res = {"config": args.config, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "vocab": model.config.text.vocab_size, "device": args.device, "threads": torch.get_num_threads(),
           "prompts": B, "group": G, "requests": B * G, "prompt_len_max": P, "prompt_len_min": int(lens.min()),
           "image_tokens": int((full.input_ids[0] == model.config.image_token_id).sum()),
           "new_tokens": args.new_tokens, "same_sampled_replies": same_replies, "same_greedy_replies": True, "choice_logprob_gap": gap,
           "processor_encode_s": round(encode_s, 3)}
    for (mode, name), ts in times.items():
        res[f"{mode}_{name}_all_s"] = [round(t, 2) for t in ts]
        res[f"{mode}_{name}_s"] = round(min(ts), 2)
        res[f"{mode}_{name}_peak_mb"] = round(mem[mode, name])
    for mode in ("sample", "logprob"):
        res[f"{mode}_ratio"] = round(res[f"{mode}_unshared_s"] / res[f"{mode}_shared_s"], 2)
    print(f"torch {torch.__version__}, threads {res['threads']}, device {args.device}, float32")
    print(f"{args.config} ({res['params_M']}M params, vocab {res['vocab']}), B={B} x G={G} = {B * G} requests, "
          f"prompts {res['prompt_len_min']}-{P} tokens ({res['image_tokens']} image tokens), processor "
          f"{encode_s:.2f} s per batch")
    for mode in ("sample", "logprob"):
        print(f"  {mode}: unshared {res[f'{mode}_unshared_s']} s (peak +{res[f'{mode}_unshared_peak_mb']} MB) | "
              f"shared {res[f'{mode}_shared_s']} s (peak +{res[f'{mode}_shared_peak_mb']} MB) | "
              f"ratio {res[f'{mode}_ratio']}x")
    print(f"  sampled replies identical: {same_replies} / {B * G}; greedy replies identical; choice log-prob gap "
          f"{gap:.1e}")
    print("json", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
