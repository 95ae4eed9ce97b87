"""python -m emor3.sft: Cold-Start SFT on SET-formatted responses (EMO-R3's Cold-Start-Emo, ~100 samples).

Before RL, the model is fine-tuned with teacher forcing on a few reference responses in the SET format
(<step1>…</step1><step2>…</step2><step3>…</step3>\\boxed{label}), so that GRPO starts from a policy that already
follows the format and the format and accuracy rewards are not all zero (the paper: it "stabilises training and
reduces reward sparsity"). The loss is the token-mean negative log-likelihood of the response tokens (the prompt
is context only), ending with the chat turn's end token so the model learns to stop.

Responses come from the dataset: EmoScenes builds them from each image's true cues; a JSONL manifest may carry
them in a ``response`` column. Run alone, this module trains and writes the checkpoint to ``RUN_DIR/sft``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm import tqdm

from emor3.config import SFTConfig
from emor3.grpo.objective import aggregate
from emor3.grpo.rollout import completion_logprobs, encode_samples


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
    samples: Sequence,
    images: Sequence,
    responses: Sequence[str],
    taxonomies: dict,
    cfg: SFTConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` in place on (sample, image, response) triples for ``cfg.steps`` steps; returns the losses."""
    if len(samples) != len(responses) or not samples:
        raise ValueError(f"Cold-Start SFT needs one response per sample and at least one: got {len(samples)} samples, {len(responses)} responses")
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
            order += torch.randperm(len(samples), generator=g).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = encode_samples(processor, [samples[i] for i in idx], [images[i] for i in idx], taxonomies).to(device)
        ids, mask = tokenize_responses(processor, [responses[i] for i in idx], device)
        logp = completion_logprobs(model, batch, torch.arange(len(idx), device=device), ids, mask)  # (n, T)
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


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    from emor3.config import parse_args, save_config
    from emor3.experiment import build_experiment

    cfg = parse_args(argv, "python -m emor3.sft", (__doc__ or "").strip())
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.toml")
    build_experiment(cfg, out, stage="sft")  # builds the model and data, runs SFT, writes RUN_DIR/sft
    print(f"[emor3] Cold-Start SFT checkpoint: {out / 'sft'}")


if __name__ == "__main__":
    main()
