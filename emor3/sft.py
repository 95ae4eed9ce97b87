"""python -m emor3.sft: Cold-Start SFT on SET-formatted responses (EMO-R3's Cold-Start-Emo, ~100 samples).

Before RL, the model is fine-tuned with teacher forcing on a few reference responses in the SET format
(<step1>…</step1><step2>…</step2><step3>…</step3>\\boxed{label}), so that GRPO starts from a policy that already
follows the format and the format and accuracy rewards are not all zero (the paper: it "stabilises training and
reduces reward sparsity"). The loss is the token-mean negative log-likelihood of the response tokens (the prompt
is context only), ending with the chat turn's end token so the model learns to stop.

Responses come from the dataset: EmoScenes builds them from each image's true cues; a JSONL manifest may carry
them in a ``response`` column, which ``python -m emor3.sft traces`` writes for real data (``emor3.traces``: SET
responses sampled from a teacher checkpoint, kept only where they pass the paper's format rule and box the right
label, i.e. rejection sampling). With ``--sft.judge-examples`` (the default) the same responses also teach the two
RER questions (``judge_examples``), which a model trained from scratch cannot otherwise answer. ``cold_start``
runs it on a built experiment and writes the checkpoint to ``RUN_DIR/sft``; ``python -m emor3.sft`` does only that.

Before it, the tiny model built from scratch gets an instruct stage (``instruct_stage``; docs/method.md, "The tiny
default's starting point"), the stand-in for the instruct checkpoint the paper starts from: SFT on descriptions of
EmoScenes scenes, one question about a cue per scene and RER's yes/no question, with no emotion label, cached per
setting in ``--sft.instruct-cache``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from emor3 import distributed as dist
from emor3.config import SFTConfig, parse_args, save_config
from emor3.data.emoscenes import (CUE_QUESTIONS, CUE_VALUES, DESCRIBE_QUESTION, INSTRUCT_SCENES_VERSION,
                                  INSTRUCT_STYLES, cue_mentions, describe_scene,
                                  instruct_scenes)
from emor3.engine.prompts import build_set_messages
from emor3.engine.sampler import sample
from emor3.engine.scoring import completion_logprobs
from emor3.experiment import Experiment, add_adapters, build_experiment, prepare_run_dir
from emor3.folders import lock_folder, run_cli, unlock_folder, wants_debug
from emor3.grpo.objective import aggregate
from emor3.models import load_pretrained, save_pretrained
from emor3.models.checkpoint import fault_point
from emor3.models.clips import Clip
from emor3.models.lora import merge_adapters
from emor3.rewards import parse_set
from emor3.rewards.reflection import (JudgeRequest, coherence_request, consistency_request, release_coherence_request,
                                     release_consistency_request, release_spans)
from emor3.traces import traces_main


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


# --------------------------------------------------------------------------------------------- instruct stage

INSTRUCT_VERSION = 2  # bump when the instruct examples or their training change, so cached checkpoints are rebuilt


def _one_cue_changed(cues: dict, rng: random.Random) -> dict:
    kind = rng.choice(sorted(CUE_VALUES))
    return dict(cues, **{kind: rng.choice([v for v in CUE_VALUES[kind] if v != cues[kind]])})


def _ask(question: str) -> list:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def instruct_examples(samples: Sequence, images: Sequence, seed: int = 0) -> list[SFTExample]:
    """What an instruct checkpoint already knows and a tiny model trained from scratch does not: to see. Per scene
    (``samples[i].metadata["cues"]``):
      - "Describe the image." -> a description of its three cues (``describe_scene``);
      - one of the cue questions (``CUE_QUESTIONS``, the kind drawn at random) -> that cue's word. A description
        puts one token of a dozen on the face's expression, the smallest cue; without the questions the tiny model
        learned it late or not at all, depending on the seed;
      - RER's consistency question (``consistency_request``, the judge's own prompt) with a description of the
        scene -> "yes", and with a description of another scene -> "no": half of the time a scene with one cue
        changed (so every cue must be checked), else one with all three drawn at random.
    No emotion label is taught."""
    rng = random.Random(f"instruct:{seed}")
    out = []
    for s, im in zip(samples, images):
        cues = s.metadata["cues"]
        out.append(SFTExample(_ask(DESCRIBE_QUESTION), [im], describe_scene(cues, rng)))
        kind = rng.choice(sorted(CUE_QUESTIONS))
        question, answers = CUE_QUESTIONS[kind]
        out.append(SFTExample(_ask(question), [im], answers[cues[kind]]))
        out.append(SFTExample(consistency_request(describe_scene(cues, rng), im).messages, [im], "yes"))
        other = cues
        while other == cues:
            other = (_one_cue_changed(cues, rng) if rng.random() < 0.5
                     else {k: rng.choice(v) for k, v in sorted(CUE_VALUES.items())})
        out.append(SFTExample(consistency_request(describe_scene(other, rng), im).messages, [im], "no"))
    return out


SHIPPED_INSTRUCT = Path(__file__).resolve().parent / "assets" / "instruct"  # the default's, built by `make instruct`


def instruct_key(model, init_dir: Path, cfg) -> str:
    """The cache key of an instruct checkpoint: a hash of the stage's starting point and every setting the stage
    reads, all of it content the project writes: the versions of the instruct examples and scenes, the model's
    architecture (its config), its weights as initialised from ``--sft.instruct-seed``, the tokenizer's vocabulary
    and merges (read as data: a tokenizers release that serialises tokenizer.json differently keeps the key, one
    that trains another vocabulary changes it) and the stage's settings. The run's own seed is not among them: every
    run seed starts from the same instruct checkpoint, as the paper's runs all start from one released model."""
    # the instruct scenes' own version, not EmoScenes' VERSION: a change to the benchmark splits that leaves the
    # instruct scenes unchanged does not change what this stage trains on
    h = hashlib.sha256(f"v{INSTRUCT_VERSION}:emoscenes-v{INSTRUCT_SCENES_VERSION}".encode())
    h.update(json.dumps(json.loads((init_dir / "config.json").read_text()), sort_keys=True).encode())
    tok = json.loads((init_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok.get("added_tokens", [])}}
    merges = [m.split(" ") if isinstance(m, str) else m for m in tok["model"].get("merges", [])]  # "a b" or [a, b]
    h.update(json.dumps([sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), merges]).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    s, d = cfg.sft, cfg.data
    h.update(repr((s.instruct_steps, s.instruct_images, s.instruct_batch_size, s.instruct_lr, s.weight_decay,
                   d.image_size, s.instruct_seed, cfg.model.dtype)).encode())
    return h.hexdigest()[:16]


def caption_recall(model, processor, samples: Sequence, images: Sequence, device) -> dict[str, float]:
    """Per cue kind, the share of images whose greedy description (``DESCRIBE_QUESTION``) names the true cue
    (``cue_mentions``); "all": the mean over the kinds."""
    batch = processor.encode_prompts([_ask(DESCRIBE_QUESTION)] * len(images), [[im] for im in images]).to(device)
    with torch.no_grad():
        roll = sample(model, batch, group_size=1, max_new_tokens=32, temperature=0.0,
                      stop_token_ids=processor.stop_token_ids, banned_token_ids=processor.banned_token_ids,
                      tokenizer=processor)
    named = Counter()
    for text, s in zip(roll.texts, samples):
        named.update({k: int(v) for k, v in cue_mentions(text, s.metadata["cues"]).named.items()})
    out = {k: named[k] / max(1, len(samples)) for k in CUE_VALUES}
    return {**out, "all": sum(out.values()) / len(out)}


HELD_OUT_PER_RENDERING = 64  # held-out scenes per rendering on which the instruct model's descriptions are scored


def build_instruct(exp: Experiment, cache: Path) -> None:
    """Train ``exp.model`` (initialised from ``--sft.instruct-seed``) on ``instruct_examples`` and save it, with
    ``instruct.json`` (its settings and the share of true cues it names per rendering on held-out scenes), to
    ``cache``, written whole or not at all."""
    cfg = exp.cfg
    seed, n = cfg.sft.instruct_seed, cfg.sft.instruct_images
    scenes = instruct_scenes(n, seed=seed, image_size=cfg.data.image_size)
    examples = instruct_examples(scenes, [s.open_image() for s in scenes], seed=seed)
    print(f"[emor3] instruct stage: {len(scenes)} scenes, {len(examples)} examples, {cfg.sft.instruct_steps} steps "
          f"(cached in {cache})")
    stage = SFTConfig(steps=cfg.sft.instruct_steps, batch_size=cfg.sft.instruct_batch_size, lr=cfg.sft.instruct_lr,
                      weight_decay=cfg.sft.weight_decay)
    exp.model.freeze_vision(False)  # the stage teaches the model to see, whatever --model.freeze-vision says of the run
    sft(exp.model, exp.processor, examples, stage, seed=seed, device=exp.device, progress=cfg.run.progress,
        desc="instruct stage")
    exp.model.freeze_vision(cfg.model.freeze_vision)
    k = len(INSTRUCT_STYLES)
    held_out = instruct_scenes(n + k * HELD_OUT_PER_RENDERING, seed=seed, image_size=cfg.data.image_size)[n:]
    recall = {}
    for style in INSTRUCT_STYLES:  # scenes the stage never trained on, per rendering
        part = [s for s in held_out if s.metadata["rendering"] == style.palette]
        recall[style.palette] = caption_recall(exp.model, exp.processor, part, [s.open_image() for s in part],
                                               exp.device)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(exp.model, tmp, tokenizer_dir=exp.source_dir)
    (tmp / "instruct.json").write_text(json.dumps(
        {"caption_cue_recall": recall, "steps": cfg.sft.instruct_steps, "scenes": n, "seed": seed,
         "held_out_per_rendering": HELD_OUT_PER_RENDERING, "torch": torch.__version__,
         "torch_threads": torch.get_num_threads()}, indent=1))  # what a bit-exact rebuild needs besides the key
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.replace(cache)  # a crash never leaves a folder that looks complete
    except OSError:  # another run with the same settings finished first: keep its checkpoint (the same one)
        if not (cache / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def find_instruct(exp: Experiment) -> tuple[Path, Path | None]:
    """Where this setting's instruct checkpoint is cached (``--sft.instruct-cache``/<key>) and where it is found:
    there, in the checkpoints shipped with the package (``SHIPPED_INSTRUCT``), or None. Initialises ``exp.model``
    from ``--sft.instruct-seed`` (the stage's starting point, hashed into the key)."""
    cfg = exp.cfg
    exp.model.init_weights(cfg.sft.instruct_seed)
    key = instruct_key(exp.model, exp.source_dir, cfg)
    cache = Path(cfg.sft.instruct_cache) / key
    for where in (cache, SHIPPED_INSTRUCT / key):
        if (where / "config.json").is_file():
            return cache, where
    return cache, None


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder's files (a flat folder) into a new folder ``dst``. The copies are new files of this
    run, so they get the mode any file it writes gets (0666 less the umask), not the source's (copytree would keep
    the cache's or the package's modes)."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copyfile(f, dst / f.name)


def instruct_stage(exp: Experiment, out: Path) -> None:
    """The tiny model's stand-in for an instruct checkpoint (the paper starts from Qwen2.5-VL-Instruct, which already
    sees and answers yes/no questions): SFT on ``instruct_examples`` of ``--sft.instruct-images`` scenes drawn for
    it in every rendering of the benchmark, before Cold-Start SFT. Built once per setting (``build_instruct``) into
    ``--sft.instruct-cache``/<instruct_key> and reused like a downloaded checkpoint; the default setting's ships
    with the package (``SHIPPED_INSTRUCT``). Copied to ``RUN_DIR/instruct``, which the run then starts from
    (``exp.source_dir``; a resumed run finds it there). Skipped for checkpoints (``--model.path``), when resuming,
    and when ``--sft.instruct-steps`` is 0."""
    cfg = exp.cfg
    if cfg.model.path or cfg.sft.instruct_steps <= 0 or exp.resume_dir is not None:
        return
    run_dir = out / "instruct"
    cache, found = find_instruct(exp)
    built = False
    if found is None and dist.is_main():
        # one builder per setting: a second run of the same setting waits for the first and reuses its checkpoint
        lock_folder(cache.parent, "instruct stage", wait=True, name=f".{cache.name}.lock")
        try:
            cache, found = find_instruct(exp)
            if found is None:
                build_instruct(exp, cache)
                found, built = cache, True
        finally:
            unlock_folder(cache.parent, name=f".{cache.name}.lock")
    if found is None:
        raise RuntimeError(f"instruct stage: {cache} missing on rank {dist.rank()} (rank 0 builds it first)")
    if not built:
        exp.model.load_state_dict(load_pretrained(found, dtype=getattr(torch, cfg.model.dtype)).state_dict())
        dist.print0(f"[emor3] instruct stage: reusing {found}")
    if dist.is_main():
        shutil.rmtree(run_dir, ignore_errors=True)
        copy_checkpoint(found, run_dir)
    exp.source_dir = run_dir
    meta = json.loads((run_dir / "instruct.json").read_text())
    for rendering, r in meta["caption_cue_recall"].items():
        dist.print0(f"[emor3] instruct model: describing {meta['held_out_per_rendering']} held-out scenes of the "
                    f"{rendering} rendering, it names the true face in {100 * r['face']:.0f}%, sky "
                    f"{100 * r['sky']:.0f}%, object {100 * r['object']:.0f}%")


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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
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


def cold_start(exp: Experiment, out: Path) -> None:
    """Cold-Start SFT of ``exp.model`` on the run's cold-start responses, saved to ``RUN_DIR/sft``. Skipped when
    resuming or when ``--sft.steps`` is 0. Under torchrun rank 0 trains first (the caller runs this under
    ``dist.rank0_first``) and the other ranks load what it saved instead of repeating it."""
    cfg = exp.cfg
    sft_dir = out / "sft"
    instruct_stage(exp, out)
    if exp.resume_dir is not None or cfg.sft.steps <= 0:
        return
    if not dist.is_main() and (sft_dir / "config.json").is_file():
        saved = load_pretrained(sft_dir, dtype=getattr(torch, cfg.model.dtype), device=exp.device)
        exp.model.load_state_dict(saved.state_dict())
        return
    cold = exp.cold_start
    if cold is None:
        data = cfg.data.train or "TRAIN"
        print("[emor3] no cold-start responses in the training data (a 'response' column): skipping Cold-Start SFT. "
              f"Make them by rejection sampling from a teacher checkpoint: python -m emor3.sft traces --teacher "
              f"CHECKPOINT --data {data} --n {cfg.data.cold_start} --per-image 4 --out traces.jsonl, then train "
              "with --data traces.jsonl")
        return
    images = [cold.image(i) for i in range(len(cold))]
    responses = [s.metadata["response"] for s in cold.samples]
    examples = set_examples(cold.samples, images, responses, exp.taxonomies)
    if cfg.sft.judge_examples:
        examples += judge_examples(cold.samples, images, responses, exp.taxonomies, seed=cfg.run.seed,
                                   prompt=cfg.reward.judge_prompt)
    print(f"[emor3] Cold-Start SFT: {len(cold)} samples, {len(examples)} examples, {cfg.sft.steps} steps")
    if cfg.model.lora_rank:  # LoRA: SFT trains adapters, then folds them in, so RUN_DIR/sft is a whole model
        add_adapters(exp.model, cfg)
    sft(exp.model, exp.processor, examples, cfg.sft, seed=cfg.run.seed, device=exp.device, progress=cfg.run.progress,
        compute_dtype=dist.compute_dtype(cfg.run.mixed_precision, exp.device))
    merge_adapters(exp.model)
    save_pretrained(exp.model, sft_dir, tokenizer_dir=exp.source_dir)


def instruct_main(argv: list[str]) -> None:
    """python -m emor3.sft instruct [flags]: only the instruct stage of the run the same flags describe, into
    ``--sft.instruct-cache`` (built there unless a checkpoint of that setting exists) and ``RUN_DIR/instruct``."""
    cfg = parse_args(argv, "python -m emor3.sft instruct", (instruct_stage.__doc__ or "").strip(),
                     default_out="runs/instruct")
    if cfg.model.path or cfg.sft.instruct_steps <= 0:
        raise SystemExit("python -m emor3.sft instruct: the instruct stage is for the tiny model built from scratch "
                         "(no --model.path) with --sft.instruct-steps > 0")
    out = prepare_run_dir(cfg, "python -m emor3.sft instruct")
    save_config(cfg, out / "config.toml")
    instruct_stage(build_experiment(cfg, out), out)
    print(f"[emor3] instruct checkpoint: {out / 'instruct'}")


def sft_main(argv: list[str]) -> None:
    cfg = parse_args(argv, "python -m emor3.sft", (__doc__ or "").strip(), default_out="runs/sft")
    out = prepare_run_dir(cfg, "python -m emor3.sft")  # refuses a folder holding a run; locks it
    save_config(cfg, out / "config.toml")
    cold_start(build_experiment(cfg, out), out)  # builds the model and data, runs SFT, writes RUN_DIR/sft
    print(f"[emor3] Cold-Start SFT checkpoint: {out / 'sft'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = {"traces": traces_main, "instruct": instruct_main}.get(argv[0] if argv else "")
    if command is not None:
        run_cli(command, argv[1:], debug=wants_debug(argv))
        return
    run_cli(sft_main, argv, debug=wants_debug(argv))


if __name__ == "__main__":
    main()
