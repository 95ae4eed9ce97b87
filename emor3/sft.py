"""python -m emor3.sft: Cold-Start SFT on SET-formatted responses (EMO-R3's Cold-Start-Emo, ~100 samples).

Before RL, the model is fine-tuned with teacher forcing on a few reference responses in the SET format
(<step1>…</step1><step2>…</step2><step3>…</step3>\\boxed{label}), so that GRPO starts from a policy that already
follows the format and the format and accuracy rewards are not all zero (the paper: it "stabilises training and
reduces reward sparsity"). The loss is the token-mean negative log-likelihood of the response tokens (the prompt
is context only), ending with the chat turn's end token so the model learns to stop.

Responses come from the dataset: EmoScenes builds them from each image's true cues; a JSONL manifest may carry
them in a ``response`` column. With ``--sft.judge-examples`` (the default) the same responses also teach the two
RER questions (``judge_examples``), which a model trained from scratch cannot otherwise answer. ``cold_start``
runs it on a built experiment and writes the checkpoint to ``RUN_DIR/sft``; ``python -m emor3.sft`` does only that.
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
from emor3.config import SFTConfig, parse_args, save_config
from emor3.engine.prompts import build_set_messages
from emor3.engine.scoring import completion_logprobs
from emor3.experiment import Experiment, add_adapters, build_experiment
from emor3.grpo.objective import aggregate
from emor3.models import load_pretrained, save_pretrained
from emor3.models.lora import merge_adapters
from emor3.rewards import parse_set
from emor3.rewards.reflection import coherence_request, consistency_request


@dataclass
class SFTExample:
    """One teacher-forced example: a single-turn chat prompt, its images, and the reply to learn."""

    messages: list  # chat messages in the Processor's format
    images: list  # the PIL images the messages refer to, in order (empty for text-only prompts)
    response: str


def set_examples(samples: Sequence, images: Sequence, responses: Sequence[str], taxonomies: dict) -> list[SFTExample]:
    """The Cold-Start-Emo examples: the SET prompt of each sample (its taxonomy's labels) and its SET response."""
    return [SFTExample(build_set_messages(taxonomies[s.taxonomy], question=getattr(s, "question", None)), [im], r)
            for s, im, r in zip(samples, images, responses)]


def judge_examples(samples: Sequence, images: Sequence, responses: Sequence[str], taxonomies: dict,
                   seed: int = 0) -> list[SFTExample]:
    """Teach RER's two questions from the same responses, for models that do not follow instructions.

    An instruct checkpoint answers "Can the following text describe the image?" and "Which emotion best describes
    the text above?" out of the box (the paper relies on it); a model trained from scratch (the tiny default) does
    not, and without this its judgements are constant and RER carries no signal. Per sample: the consistency
    prompt with its own step 1 -> "yes", with the step 1 of a sample with a different label -> "no", and the
    coherence prompt (steps 1-2, the taxonomy's labels) -> the label. Prompts are exactly the judges' own.
    """
    rng = random.Random(f"sft-judge:{seed}")
    parsed = [parse_set(r) for r in responses]
    out = []
    for i, (s, im, p) in enumerate(zip(samples, images, parsed)):
        if not (p.step1 and p.step2):
            continue
        req = consistency_request(p.step1, im)
        out.append(SFTExample(req.messages, [im], "yes"))
        others = [j for j, q in enumerate(parsed) if samples[j].label != s.label and q.step1]
        if others:
            req = consistency_request(parsed[rng.choice(others)].step1, im)
            out.append(SFTExample(req.messages, [im], "no"))
        req = coherence_request(p.step1, p.step2, taxonomies[s.taxonomy].labels)
        out.append(SFTExample(req.messages, [], s.label))
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
) -> list[float]:
    """Fine-tune ``model`` in place on ``examples`` for ``cfg.steps`` steps of ``cfg.batch_size``; returns losses."""
    if not examples:
        raise ValueError("Cold-Start SFT needs at least one example")
    if cfg.steps <= 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # cosine from lr to 10% of it: a short warm-up run, no need for a long tail at the full rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="Cold-Start SFT", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        if len(order) < cfg.batch_size:  # reshuffle per epoch
            order += torch.randperm(len(examples), generator=g).tolist()
        chunk, order = [examples[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        # a Thinking model answers the SFT targets after an empty reasoning block (its template's no-thinking form)
        batch = processor.encode_prompts([e.messages for e in chunk], [e.images for e in chunk],
                                         close_thinking=True).to(device)
        ids, mask = tokenize_responses(processor, [e.response for e in chunk], device)
        logp = completion_logprobs(model, batch, torch.arange(len(chunk), device=device), ids, mask)  # (n, T)
        loss = -aggregate(logp, mask, mode="token-mean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(nll=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def cold_start(exp: Experiment, out: Path) -> None:
    """Cold-Start SFT of ``exp.model`` on the run's cold-start responses, saved to ``RUN_DIR/sft``. Skipped when
    resuming or when ``--sft.steps`` is 0. Under torchrun rank 0 trains first (the caller runs this under
    ``dist.rank0_first``) and the other ranks load what it saved instead of repeating it."""
    cfg = exp.cfg
    sft_dir = out / "sft"
    if exp.resume_dir is not None or cfg.sft.steps <= 0:
        return
    if not dist.is_main() and (sft_dir / "config.json").is_file():
        saved = load_pretrained(sft_dir, dtype=getattr(torch, cfg.model.dtype), device=exp.device)
        exp.model.load_state_dict(saved.state_dict())
        return
    cold = exp.cold_start
    if cold is None:
        print("[emor3] no cold-start responses in the training data (a 'response' column): skipping Cold-Start SFT")
        return
    images = [cold.image(i) for i in range(len(cold))]
    responses = [s.metadata["response"] for s in cold.samples]
    examples = set_examples(cold.samples, images, responses, exp.taxonomies)
    if cfg.sft.judge_examples:
        examples += judge_examples(cold.samples, images, responses, exp.taxonomies, seed=cfg.run.seed)
    print(f"[emor3] Cold-Start SFT: {len(cold)} samples, {len(examples)} examples, {cfg.sft.steps} steps")
    if cfg.model.lora_rank:  # LoRA: SFT trains adapters, then folds them in, so RUN_DIR/sft is a whole model
        add_adapters(exp.model, cfg)
    sft(exp.model, exp.processor, examples, cfg.sft, seed=cfg.run.seed, device=exp.device, progress=cfg.run.progress)
    merge_adapters(exp.model)
    save_pretrained(exp.model, sft_dir, tokenizer_dir=exp.source_dir)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, "python -m emor3.sft", (__doc__ or "").strip())
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.toml")
    cold_start(build_experiment(cfg, out), out)  # builds the model and data, runs SFT, writes RUN_DIR/sft
    print(f"[emor3] Cold-Start SFT checkpoint: {out / 'sft'}")


if __name__ == "__main__":
    main()
