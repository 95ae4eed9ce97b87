"""Seconds per GRPO step: emor3's own loop against TRL's ``GRPOTrainer``, same model folder, prompts and lengths.

The workload: 8 prompts x 8 samples, at most 64 new tokens, β = 0.01, temperature 1, fp32, CPU; by default the tiny
model with one 112x112 image per prompt, ``--model 100m --image-size 448`` the EmoSet-shaped one (100.4M parameters,
a 32k vocabulary, 256 image tokens per prompt). Both sides start from the SAME saved folder
(``emor3.toy.model.build_tiny_checkpoint``, written once here and loaded by emor3's ``load_pretrained`` and by
transformers' ``Qwen2_5_VLForConditionalGeneration``; its processor keeps a ``--image-size`` square image at its size
on both sides), train on the same EmoScenes training split (SET prompts with the mikels8 labels, one
``--image-size`` square image each), and score completions
with the same rule rewards, weighted as emor3's ``paper`` preset without the RER terms: 0.8 * accuracy +
0.1 * format (``emor3.rewards.accuracy_reward`` / ``format_reward``, wrapped as TRL reward functions).

Objective settings, matched where both trainers have the knob: one optimizer step per rollout batch (μ = 1, one
mini-batch; ``--micro-batch-rows`` rows per forward/backward with gradient accumulation, the same on both
sides), token-mean over the batch (emor3 "token-mean" = TRL ``loss_type="dapo"``), clip 0.2 / 0.3, k3 KL to a
frozen reference with β = 0.01, AdamW lr 1e-4, weight decay 0.01, grad clip 1.0, constant schedule, no gradient
checkpointing (TRL turns it on by default; off on both sides so neither recomputes activations), no dropout,
fp32 (TRL's default is bf16 autocast: off). emor3 runs ``--algo grpo`` (no RER judge), so neither side spends time
on reflection. Differences that remain: emor3 adds dual clip 3.0 (a free elementwise op); TRL generates with
transformers' ``generate`` (the G copies of a prompt are prefilled G times and its image encoded G times), emor3
with its own sampler (prefill once, KV cache copied to the G rows).

Timing. emor3: ``emor3.grpo.train.train(cfg)`` in-process, per-step ``time/*`` and ``peak_memory_mb`` read back
from RUN_DIR/metrics.jsonl. TRL: a ``TrainerCallback`` takes the wall time between consecutive ``on_step_end``
calls (so data loading, generation, scoring, reference, forward/backward and the optimizer are all inside), and
the trainer's ``model.generate``, ``_calculate_rewards`` and reference log-prob calls are wrapped with timers for
the split. Both report the median over the steps after the first (the first pays one-off allocation costs), and
the prompt lengths P and image grids each side actually fed its model (emor3: ``Processor.encode_prompts``; TRL:
the prompt ids and ``image_grid_thw`` its generation receives), so a mismatch in the inputs shows.
Each side runs in its own subprocess, one after the other, so its peak RSS (``ru_maxrss``, the high-water mark
of the process: weights, reference copy, optimizer state, activations) is its own.

    .venv/bin/pip install -e '.[bench]'            # TRL: a benchmark-only extra, never a runtime dependency
    .venv/bin/python benchmarks/bench_train.py     # both sides, then the table with the ratio
    .venv/bin/python benchmarks/bench_train.py --steps 6 --side emor3   # one side only (prints its JSON)
    .venv/bin/python benchmarks/bench_train.py --model 100m --image-size 448 --micro-batch-rows 16 --steps 2 --threads 1

Shape legend: B prompts per step (8), G samples per prompt (8), N = B·G rows (64), T completion length (<= 64).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

B, G, BETA = 8, 8, 0.01
SEED = 0
TAXONOMY = "mikels8"
# emor3's "paper" weights with the RER terms dropped, as ``--algo grpo`` does (emor3.stages.build.build)
W_ACCURACY, W_FORMAT = 0.8, 0.1
LR, WEIGHT_DECAY, GRAD_CLIP, CLIP_LOW, CLIP_HIGH = 1e-4, 0.01, 1.0, 0.2, 0.3


@dataclass(frozen=True)
class Workload:
    """What both sides run: the model size (a name from emor3.models.sizes.NAMED), the square image side in pixels,
    the completion cap T and the rows per forward/backward."""

    model: str = "tiny"
    image_size: int = 112
    max_new_tokens: int = 64
    micro_batch_rows: int = B * G
    algo: str = "grpo"  # emor3's preset; "emo_r3" adds the RER judge (emor3 alone: TRL has no judge)

    def model_dir(self, work: Path) -> Path:
        return work / ("model" if (self.model, self.image_size) == ("tiny", 112) else
                       f"model-{self.model}-{self.image_size}px")

    def cli(self) -> list[str]:
        return ["--model", self.model, "--image-size", str(self.image_size), "--max-new-tokens",
                str(self.max_new_tokens), "--micro-batch-rows", str(self.micro_batch_rows), "--algo", self.algo]


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def median_after_first(xs: list[float]) -> float:
    """Median over the steps after the first one (which pays one-off allocation and warm-up costs)."""
    if len(xs) < 2:
        raise ValueError(f"need at least 2 timed steps to drop the first, got {len(xs)}")
    return statistics.median(xs[1:])


def emoscenes_kwargs(steps: int, w: Workload) -> dict:
    # enough training prompts that no prompt repeats within the run; a tiny test split for emor3's evaluation
    return dict(seed=SEED, n_train=B * (steps + 1), n_test=8, n_ood=0, image_size=w.image_size, n_coldstart=0)


def filler_words(n: int, seed: int) -> list[str]:
    """n seeded pseudo-words, 50 to a line: extra tokenizer corpus so a size's vocabulary (32k for "100m") fills up
    (the SET prompts and EmoScenes traces alone yield a few thousand merges)."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))) for _ in range(n)]
    return [" ".join(words[i:i + 50]) for i in range(0, n, 50)]


def prompt_shapes(lengths: list[int], grids: list[tuple[int, ...]]) -> dict:
    """Unpadded prompt lengths (image tokens included) and the distinct image grids (t, h, w) in patches."""
    return {"prompt_len_min": min(lengths), "prompt_len_max": max(lengths), "prompts_seen": len(lengths),
            "image_grids": sorted({tuple(int(x) for x in g) for g in grids})}


# --------------------------------------------------------------------------------------------- shared inputs


def prepare(work: Path, steps: int, w: Workload) -> None:
    """The model folder and the EmoScenes cache both sides read (built offline, reused when present)."""
    import torch

    from emor3.data import get_taxonomy
    from emor3.toy.emoscenes import load_emoscenes
    from emor3.toy.model import tokenizer_corpus
    from emor3.models.sizes import NAMED
    from emor3.toy.model import build_tiny_checkpoint

    model_dir = w.model_dir(work)
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(SEED)
        corpus = tokenizer_corpus([get_taxonomy(TAXONOMY)])
        # tiny: the same call emor3.toy.world.tiny_model makes for a run without --model.path (vocab 1024);
        # larger sizes: their own vocabulary, filled with seeded filler words
        vocab = 1024 if w.model == "tiny" else NAMED[w.model]["vocab_size"]
        if w.model != "tiny":
            corpus = corpus + filler_words(60000, SEED)
        build_tiny_checkpoint(model_dir, corpus, name=w.model, seed=SEED, vocab_size=vocab,
                              image_pixels=w.image_size * w.image_size)
    load_emoscenes(work / "emoscenes", **emoscenes_kwargs(steps, w))


# --------------------------------------------------------------------------------------------- emor3 side


def run_emor3(work: Path, steps: int, w: Workload, sample_chunk: int = B) -> dict:
    import torch

    from emor3.config import config_from_dict
    from emor3.grpo.train import train
    from emor3.models.processing import Processor

    out = work / "emor3_run"
    shutil.rmtree(out, ignore_errors=True)
    es = emoscenes_kwargs(steps, w)
    px = w.image_size * w.image_size
    lengths, grids = [], []
    encode = Processor.encode_prompts

    def recording_encode(self, *a, **kw):  # the prompts emor3 feeds its model (evaluation and rollouts)
        batch = encode(self, *a, **kw)
        lengths.extend(batch.attention_mask.sum(-1).tolist())
        if batch.image_grid_thw is not None:
            grids.extend(batch.image_grid_thw.tolist())
        return batch

    Processor.encode_prompts = recording_encode
    cfg = config_from_dict({
        "model": {"path": str(w.model_dir(work)), "device": "cpu", "dtype": "float32",
                  "min_pixels": px, "max_pixels": px},
        "data": {"cache_dir": str(work / "emoscenes"), "emoscenes_train": es["n_train"], "emoscenes_test": es["n_test"],
                 "emoscenes_ood": es["n_ood"], "image_size": w.image_size, "cold_start": 0},
        "sft": {"steps": 0},
        "grpo": {"algo": w.algo, "steps": steps, "prompts_per_step": B, "group_size": G, "mini_batch_prompts": B,
                 "micro_batch_rows": w.micro_batch_rows, "epochs": 1, "max_new_tokens": w.max_new_tokens,
                 "temperature": 1.0, "top_p": 1.0, "top_k": 0, "lr": LR, "weight_decay": WEIGHT_DECAY,
                 "grad_clip": GRAD_CLIP, "kl_coef": BETA, "kl_kind": "k3", "loss_agg": "token-mean",
                 "clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, "sample_chunk": sample_chunk},
        # --algo emo_r3: the paper's weights, RER terms included
        "reward": {"weights": f"accuracy={W_ACCURACY},format={W_FORMAT}" if w.algo == "grpo" else "paper"},
        "eval": {"max_new_tokens": 4, "batch_size": 8},
        "run": {"out": str(out), "seed": SEED, "progress": False, "sample_every": 0},
    })
    t0 = time.perf_counter()
    try:
        train(cfg)
    finally:
        Processor.encode_prompts = encode
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == steps, f"metrics.jsonl has {len(rows)} rows for {steps} steps"
    split = {k: median_after_first([r[f"time/{k}"] for r in rows]) for k in ("rollout", "judge", "reference", "update")}
    return {
        "side": "emor3", "steps": steps, "threads": torch.get_num_threads(), "sample_chunk": sample_chunk,
        "workload": asdict(w), **prompt_shapes(lengths, grids),
        "step_s": [r["time/step"] for r in rows],
        "median_step_s": median_after_first([r["time/step"] for r in rows]),
        # rollout = sampling + decoding texts + rule rewards (judge is 0 with --algo grpo)
        "split_s": {"generation+rewards": split["rollout"] + split["judge"], "reference": split["reference"],
                    "update": split["update"]},
        "phases_s": split,  # the same medians with the RER judge apart from the rollout
        "completion_len_mean": statistics.mean(r["completion_len_mean"] for r in rows),
        "reward_mean": statistics.mean(r["reward/total"] for r in rows),
        "peak_rss_mb_training": max(r["peak_memory_mb"] for r in rows),  # before the final evaluation
        "peak_rss_mb_process": rss_peak_mb(),
        "wall_s_incl_setup_and_eval": wall,
    }


# --------------------------------------------------------------------------------------------- TRL side


class _Timer:
    """Wraps a callable; records the wall seconds of each call into ``bucket``."""

    def __init__(self, fn, bucket: list):
        self.fn, self.bucket = fn, bucket

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.bucket.append(time.perf_counter() - t0)


def _completion_text(c) -> str:
    """TRL passes conversational completions as [{"role": "assistant", "content": text}], plain ones as str."""
    if isinstance(c, str):
        return c
    content = c[-1]["content"]
    if isinstance(content, list):  # content blocks
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def run_trl(work: Path, steps: int, w: Workload) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin
    from trl import GRPOConfig, GRPOTrainer

    from emor3.data import get_taxonomy
    from emor3.toy.emoscenes import load_emoscenes
    from emor3.rewards import accuracy_reward, build_set_messages, format_reward

    model_dir = w.model_dir(work)
    tax = get_taxonomy(TAXONOMY)

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        """transformers' Qwen2.5-VL processor without the video processor (it needs torchvision, not installed)."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left", truncation_side="left")
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"], patch_size=pre["patch_size"],
        merge_size=pre["merge_size"], temporal_patch_size=pre["temporal_patch_size"],
        image_mean=pre["image_mean"], image_std=pre["image_std"])
    processor = ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=tokenizer.chat_template)

    # the same training split emor3 reads (same cache folder, same seed); SET prompt with the image slot first
    train_split = load_emoscenes(work / "emoscenes", **emoscenes_kwargs(steps, w))["train"]
    rows = []
    for i in range(len(train_split)):
        s = train_split[i]
        rows.append({"prompt": build_set_messages(tax), "image": train_split.image(i).convert("RGB"), "label": s.label})
    dataset = Dataset.from_list(rows)

    def accuracy(prompts, completions, label, **kw):
        return [accuracy_reward(_completion_text(c), y, tax) for c, y in zip(completions, label)]

    def fmt(prompts, completions, **kw):
        return [format_reward(_completion_text(c)) for c in completions]

    # one generation of B·G rows per optimizer step, consumed in micro-batches of micro_batch_rows
    assert (B * G) % w.micro_batch_rows == 0, f"--micro-batch-rows {w.micro_batch_rows} must divide {B * G}"
    args = GRPOConfig(
        output_dir=str(work / "trl_run"), max_steps=steps, seed=SEED,
        per_device_train_batch_size=w.micro_batch_rows, gradient_accumulation_steps=B * G // w.micro_batch_rows,
        steps_per_generation=B * G // w.micro_batch_rows, num_generations=G,
        max_completion_length=w.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=BETA,
        loss_type="dapo", epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, num_iterations=1, scale_rewards="group",
        reward_weights=[W_ACCURACY, W_FORMAT], learning_rate=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP,
        lr_scheduler_type="constant", warmup_steps=0, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, use_vllm=False, model_init_kwargs={"dtype": torch.float32}, report_to="none",
        logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )

    step_ends: list[float] = []
    logs_seen: list[dict] = []  # what the trainer logs each step (completion lengths, reward)
    gen_s, reward_s, ref_s = [], [], []  # one entry per call (the reference runs once per micro-batch)
    marks: list[tuple[int, int, int]] = []  # (len(gen_s), len(reward_s), len(ref_s)) at each step end

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())
            marks.append((0, 0, 0))

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())
            marks.append((len(gen_s), len(reward_s), len(ref_s)))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                logs_seen.append(dict(logs))

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[accuracy, fmt], args=args, train_dataset=dataset,
                          processing_class=processor, callbacks=[StepClock()])
    trainer.model.generate = _Timer(trainer.model.generate, gen_s)
    trainer._calculate_rewards = _Timer(trainer._calculate_rewards, reward_s)
    inner = trainer._get_per_token_logps_and_entropies

    def logps(model, *a, **kw):  # the reference model's no-grad pass, timed apart from the policy's
        if model is trainer.ref_model:
            return _Timer(inner, ref_s)(model, *a, **kw)
        return inner(model, *a, **kw)

    trainer._get_per_token_logps_and_entropies = logps
    lengths, grids = [], []
    generate_turn = trainer._generate_single_turn

    def recording_turn(prompt_ids, images, multimodal_fields, *a, **kw):  # the prompts TRL feeds its model
        lengths.extend(len(ids) for ids in prompt_ids)
        if multimodal_fields.get("image_grid_thw") is not None:
            grids.extend(torch.as_tensor(multimodal_fields["image_grid_thw"]).tolist())
        return generate_turn(prompt_ids, images, multimodal_fields, *a, **kw)

    trainer._generate_single_turn = recording_turn
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    step_s = [b - a for a, b in zip(step_ends, step_ends[1:])]
    assert len(step_s) == steps and len(gen_s) == steps, (len(step_s), len(gen_s), steps)

    def per_step(bucket: list[float], k: int) -> list[float]:  # the calls that fell inside each step, summed
        return [sum(bucket[m0[k]:m1[k]]) for m0, m1 in zip(marks, marks[1:])]

    gen, rew, ref, step = (median_after_first(x) for x in (per_step(gen_s, 0), per_step(reward_s, 1),
                                                           per_step(ref_s, 2), step_s))
    lens = [entry["completions/mean_length"] for entry in logs_seen if "completions/mean_length" in entry]
    rewards = [entry["reward"] for entry in logs_seen if "reward" in entry]
    return {
        "side": "trl", "steps": steps, "threads": torch.get_num_threads(), "workload": asdict(w),
        **prompt_shapes(lengths, grids),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "step_s": step_s, "median_step_s": step,
        "split_s": {"generation+rewards": gen + rew, "generation": gen, "rewards": rew, "reference": ref,
                    "update": step - gen - rew - ref},  # update = the rest: policy fwd/bwd, optimizer, bookkeeping
        "completion_len_mean": statistics.mean(lens) if lens else float("nan"),
        "reward_mean": statistics.mean(rewards) if rewards else float("nan"),
        "peak_rss_mb_process": rss_peak_mb(),
        "wall_s_incl_setup": wall,
    }


# --------------------------------------------------------------------------------------------- driver


def run_side(side: str, work: Path, steps: int, threads: int, sample_chunk: int, w: Workload) -> dict:
    """One side in a fresh interpreter so its RSS high-water mark is its own."""
    out = work / f"{side}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--work", str(work), "--steps", str(steps),
           "--threads", str(threads), "--sample-chunk", str(sample_chunk), *w.cli(), "--json", str(out)]
    load_before = os.getloadavg()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        return {"side": side, "error": f"exit {proc.returncode}", "log_tail": tail, "load_before": load_before}
    res = json.loads(out.read_text())
    res["load_before"], res["load_after"] = load_before, os.getloadavg()
    return res


def fmt_split(r: dict) -> str:
    s = r["split_s"]
    total = r["median_step_s"]
    return ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in s.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="GRPO steps per side; the first is dropped from the median")
    p.add_argument("--side", choices=["both", "emor3", "trl"], default="both")
    p.add_argument("--work", default="", help="folder for the model, EmoScenes cache and runs (default: a temp dir)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    p.add_argument("--sample-chunk", type=int, default=B,
                   help="emor3 --grpo.sample-chunk: prompts per sampler call (8: all of them in one call, as TRL's "
                        "single generate; 1: emor3's default, one prompt per call so rollouts do not depend on ranks)")
    p.add_argument("--model", default="tiny", help="model size, a name from emor3.models.sizes.NAMED (tiny, 100m)")
    p.add_argument("--image-size", type=int, default=112, help="side of the square images in pixels (both sides' "
                   "processors keep it: min = max pixels = its square; 448: 256 image tokens)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion cap T")
    p.add_argument("--micro-batch-rows", type=int, default=B * G,
                   help=f"rows per forward/backward on both sides (gradient accumulation over {B * G} // this)")
    p.add_argument("--algo", default="grpo", choices=["grpo", "emo_r3"],
                   help="emor3's preset (emo_r3 adds the RER judge, which TRL lacks: only with --side emor3)")
    p.add_argument("--json", default="", help="write the result(s) as JSON here")
    a = p.parse_args()
    if a.algo != "grpo" and a.side != "emor3":
        p.error("--algo emo_r3 has no TRL counterpart: use it with --side emor3")
    if a.steps < 2:
        p.error("--steps must be >= 2 (the first step is excluded from the median)")
    if a.micro_batch_rows < 1 or (B * G) % a.micro_batch_rows:
        p.error(f"--micro-batch-rows must divide {B * G}")
    w = Workload(a.model, a.image_size, a.max_new_tokens, a.micro_batch_rows, a.algo)
    work = Path(a.work) if a.work else Path(os.environ.get("TMPDIR", "/tmp")) / "emor3_bench_train"
    work.mkdir(parents=True, exist_ok=True)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)

    if a.side != "both":
        prepare(work, a.steps, w)
        res = run_emor3(work, a.steps, w, a.sample_chunk) if a.side == "emor3" else run_trl(work, a.steps, w)
        text = json.dumps(res, indent=1)
        if a.json:
            Path(a.json).write_text(text)
        else:
            print(text)
        return

    prepare(work, a.steps, w)
    results = {side: run_side(side, work, a.steps, a.threads, a.sample_chunk, w) for side in ("emor3", "trl")}
    print(f"# GRPO step: model {w.model}, {w.image_size}-px images, B={B} prompts x G={G} samples, "
          f"<= {w.max_new_tokens} new tokens, micro-batch {w.micro_batch_rows} rows, beta {BETA}, fp32 CPU, "
          f"{a.steps} steps per side (median excludes the first); emor3 sample_chunk {a.sample_chunk}; "
          f"cpu count {os.cpu_count()}")
    for side, r in results.items():
        if "error" in r:
            print(f"\n{side} FAILED ({r['error']}):\n{r['log_tail']}")
    ok = {s: r for s, r in results.items() if "error" not in r}
    if ok:
        print("\n| side | median step | steps (s) | split (medians) | mean completion len | prompt P (image grids) "
              "| peak RSS | load avg before -> after |")
        print("|---|---|---|---|---|---|---|---|")
        for side, r in ok.items():
            steps = " ".join(f"{x:.2f}" for x in r["step_s"])
            peak = r.get("peak_rss_mb_training", r["peak_rss_mb_process"])
            shapes = f"{r['prompt_len_min']}-{r['prompt_len_max']} ({r['image_grids']})"
            print(f"| {side} | {r['median_step_s']:.2f} s | {steps} | {fmt_split(r)} | "
                  f"{r['completion_len_mean']:.1f} | {shapes} | {peak:.0f} MB | "
                  f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f} |")
    if len(ok) == 2:
        ratio = ok["trl"]["median_step_s"] / ok["emor3"]["median_step_s"]
        mem = ok["trl"]["peak_rss_mb_process"] / ok["emor3"]["peak_rss_mb_training"]
        print(f"\nemor3 is {ratio:.2f}x faster per step than TRL GRPOTrainer; "
              f"TRL peak RSS / emor3 peak RSS = {mem:.2f}")
        if "versions" in ok["trl"]:
            print(f"versions: {ok['trl']['versions']}, torch threads {ok['emor3']['threads']} / {ok['trl']['threads']}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
