"""Cold-Start SFT on SET-formatted responses (EMO-R3's Cold-Start-Emo, ~100 samples; docs/method.md, "Training setup").

Before RL the model is fine-tuned with teacher forcing on a few reference responses in the SET format, so that GRPO
starts from a policy that already follows it and the format and accuracy rewards are not all zero. The loss is the
token-mean negative log-likelihood of the response tokens (the prompt is context only), ending with the chat turn's
end token so the model learns to stop. Responses come from the dataset (EmoScenes builds them from each image's true
cues; a JSONL manifest carries them in a ``response`` column, which ``python -m emor3.sft traces`` writes for real
data). With ``--sft.judge-examples`` the same responses also teach RER's two questions (``judge_examples``).
``sft`` is the loop (also the instruct stage's, ``emor3.toy.instruct``); ``cold_start`` the stage, into
``RUN_DIR/sft``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from emor3 import distributed as dist
from emor3.config import Config, SFTConfig
from emor3.engine.prompts import build_set_messages
from emor3.engine.scoring import completion_logprobs
from emor3.grpo.objective import aggregate
from emor3.models import load_pretrained, save_pretrained
from emor3.models.checkpoint import fault_point
from emor3.models.clips import Clip
from emor3.models.lora import merge_adapters
from emor3.rewards import parse_set
from emor3.rewards.reflection import (JudgeRequest, coherence_request, consistency_request, release_coherence_request,
                                     release_consistency_request, release_spans)
from emor3.stages.build import Run, add_adapters


@dataclass
class SFTExample:
    """One teacher-forced example: a single-turn chat prompt, its images, and the reply to learn."""

    messages: list  # chat messages in the Processor's format
    images: list  # the PIL images the messages refer to, in order (empty for text-only prompts)
    response: str


def set_examples(samples: Sequence, images: Sequence, responses: Sequence[str], taxonomies: dict) -> list[SFTExample]:
    """The Cold-Start-Emo examples: the SET prompt of each sample (its taxonomy's labels) and its SET response."""
    return [SFTExample(build_set_messages(taxonomies[s.taxonomy], question=getattr(s, "question", None),
                                          video=isinstance(im, Clip)), [im], r)
            for s, im, r in zip(samples, images, responses)]


def judge_examples(samples: Sequence, images: Sequence, responses: Sequence[str], taxonomies: dict,
                   seed: int = 0, prompt: str = "clean") -> list[SFTExample]:
    """Teach RER's two questions from the same responses, for models that do not follow instructions.

    An instruct checkpoint answers "Can the following text describe the image?" and "Which emotion best describes
    the text above?" out of the box (the paper relies on it); a model trained from scratch (the tiny default) does
    not, and without this its judgements are constant and RER carries no signal. Per sample: the consistency
    prompt with its own step 1 -> "yes", with the step 1 of a sample with a different label -> "no", and the
    coherence prompt (steps 1-2, the taxonomy's labels) -> the label. Prompts are exactly the judges' own, in the
    run's ``prompt`` text (``--reward.judge-prompt``: clean, or the release's with the step tags kept).
    """
    rng = random.Random(f"sft-judge:{seed}")
    parsed = [parse_set(r) for r in responses]
    release = prompt == "release"

    def consistency(j: int, im) -> JudgeRequest:
        return release_consistency_request(release_spans(responses[j])[0], im) if release else \
            consistency_request(parsed[j].step1, im)

    def coherence(j: int, labels) -> JudgeRequest:
        return release_coherence_request(release_spans(responses[j])[1], labels) if release else \
            coherence_request(parsed[j].step1, parsed[j].step2, labels)

    out = []
    for i, (s, im, p) in enumerate(zip(samples, images, parsed)):
        if not (p.step1 and p.step2):
            continue
        out.append(SFTExample(consistency(i, im).messages, [im], "yes"))
        others = [j for j, q in enumerate(parsed) if samples[j].label != s.label and q.step1]
        if others:
            out.append(SFTExample(consistency(rng.choice(others), im).messages, [im], "no"))
        out.append(SFTExample(coherence(i, taxonomies[s.taxonomy].labels).messages, [], s.label))
    return out


def tokenize_responses(processor, responses: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses + the end-of-turn token, right-padded -> ids (N, T) long and mask (N, T) float."""
    tok = processor.tokenizer
    end = processor.stop_token_ids[0]
    seqs = [tok(r, add_special_tokens=False)["input_ids"] + [end] for r in responses]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), end, dtype=torch.long)  # (N, T)
    mask = torch.zeros(len(seqs), T)  # (N, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def sft(
    model,
    processor,
    examples: Sequence[SFTExample],
    cfg: SFTConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    compute_dtype: torch.dtype | None = None,
    desc: str = "Cold-Start SFT",
) -> list[float]:
    """Fine-tune ``model`` in place on ``examples`` for ``cfg.steps`` steps of ``cfg.batch_size``; returns losses.
    ``compute_dtype`` (e.g. bf16 over fp32 parameters): the forward runs under autocast in it, the parameters and
    AdamW's moments keep their own dtype."""
    if not examples:
        raise ValueError("Cold-Start SFT needs at least one example")
    if cfg.steps <= 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # cosine from lr to 10% of it: a short warm-up run, no need for a long tail at the full rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        if len(order) < cfg.batch_size:  # reshuffle per epoch
            order += torch.randperm(len(examples), generator=g).tolist()
        chunk, order = [examples[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        # a Thinking model answers the SFT targets after an empty reasoning block (its template's no-thinking form)
        batch = processor.encode_prompts([e.messages for e in chunk], [e.images for e in chunk],
                                         close_thinking=True).to(device)
        ids, mask = tokenize_responses(processor, [e.response for e in chunk], device)
        amp = compute_dtype is not None and any(p.dtype.itemsize > compute_dtype.itemsize for p in params)
        with torch.autocast(torch.device(device).type, dtype=compute_dtype or torch.bfloat16, enabled=amp):
            logp = completion_logprobs(model, batch, torch.arange(len(chunk), device=device), ids, mask)  # (n, T)
        loss = -aggregate(logp, mask, mode="token-mean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(nll=f"{losses[-1]:.3f}")
        fault_point(f"{desc}: SFT step {len(losses)}")  # a crash-test hook (checkpoint.fault_point)
    model.eval()
    return losses


def cold_start(cfg: Config, run: Run, out: Path) -> torch.nn.Module:
    """``run.model`` after Cold-Start SFT on the run's cold-start responses (trained in place), saved to
    ``RUN_DIR/sft``; the model as it is when ``--sft.steps`` is 0 or the data has no responses. Under torchrun rank 0
    trains first (the caller runs this under ``dist.rank0_first``) and the other ranks load what it saved."""
    model, sft_dir = run.model, out / "sft"
    if cfg.sft.steps <= 0:
        return model
    if not dist.is_main() and (sft_dir / "config.json").is_file():
        saved = load_pretrained(sft_dir, dtype=getattr(torch, cfg.model.dtype), device=run.device)
        model.load_state_dict(saved.state_dict())
        return model
    cold = run.cold_start
    if cold is None:
        data = cfg.data.train or "TRAIN"
        print("[emor3] no cold-start responses in the training data (a 'response' column): skipping Cold-Start SFT. "
              f"Make them by rejection sampling from a teacher checkpoint: python -m emor3.sft traces --teacher "
              f"CHECKPOINT --data {data} --n {cfg.data.cold_start} --per-image 4 --out traces.jsonl, then train "
              "with --data traces.jsonl")
        return model
    images = [cold.image(i) for i in range(len(cold))]
    responses = [s.metadata["response"] for s in cold.samples]
    examples = set_examples(cold.samples, images, responses, run.taxonomies)
    if cfg.sft.judge_examples:
        examples += judge_examples(cold.samples, images, responses, run.taxonomies, seed=cfg.run.seed,
                                   prompt=cfg.reward.judge_prompt)
    print(f"[emor3] Cold-Start SFT: {len(cold)} samples, {len(examples)} examples, {cfg.sft.steps} steps")
    if cfg.model.lora_rank:  # LoRA: SFT trains adapters, then folds them in, so RUN_DIR/sft is a whole model
        add_adapters(model, cfg)
    sft(model, run.processor, examples, cfg.sft, seed=cfg.run.seed, device=run.device, progress=cfg.run.progress,
        compute_dtype=dist.compute_dtype(cfg.run.mixed_precision, run.device))
    merge_adapters(model)
    save_pretrained(model, sft_dir, tokenizer_dir=run.source_dir)
    return model
