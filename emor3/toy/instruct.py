"""The instruct stage: the tiny model's stand-in for the instruct checkpoint the paper starts from (docs/method.md,
"The tiny default's starting point").

The paper starts from Qwen2.5-VL-Instruct, which already sees and answers yes/no questions; a tiny model trained from
scratch does neither. Before Cold-Start SFT the default run teaches it with teacher-forced SFT on descriptions of
EmoScenes scenes, one question about a cue per scene and RER's yes/no question, with no emotion label
(``instruct_examples``), on ``--sft.instruct-images`` scenes drawn for it in every rendering of the benchmark. The
checkpoint is built once per setting into ``--sft.instruct-cache``/<``instruct_key``> and reused like a downloaded
checkpoint; the default setting's ships with the package (``SHIPPED_INSTRUCT``). ``instruct_stage`` copies it to
``RUN_DIR/instruct``, which the run then starts from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from emor3 import distributed as dist
from emor3.config import Config, SFTConfig, parse_args, save_config
from emor3.engine.sampler import sample
from emor3.folders import lock_folder, unlock_folder
from emor3.models import load_pretrained, save_pretrained
from emor3.rewards.reflection import consistency_request
from emor3.run_folder import prepare_run_dir
from emor3.stages.build import Run, build, load_model, prepare_model
from emor3.stages.cold_start import SFTExample, sft
from emor3.toy.emoscenes import (CUE_QUESTIONS, CUE_VALUES, DESCRIBE_QUESTION, INSTRUCT_SCENES_VERSION,
                                 INSTRUCT_STYLES, cue_mentions, describe_scene, instruct_scenes)
from emor3.toy.world import WORLD

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


# the default setting's checkpoint, built by `make instruct`
SHIPPED_INSTRUCT = Path(__file__).resolve().parents[1] / "assets" / "instruct"


def instruct_key(model, init_dir: Path, cfg: Config) -> str:
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


def applies(cfg: Config) -> bool:
    """The stage runs for the tiny model built from scratch (no ``--model.path``) with ``--sft.instruct-steps`` > 0."""
    return not cfg.model.path and cfg.sft.instruct_steps > 0


def starting_model(cfg: Config, init_dir: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The stage's starting point: the model of ``init_dir`` (``RUN_DIR/init``) with fresh weights from
    ``--sft.instruct-seed``, not the run's seed: every run seed starts from the same instruct checkpoint."""
    return load_pretrained(init_dir, dtype=getattr(torch, cfg.model.dtype), device=device).init_weights(
        cfg.sft.instruct_seed)


def find_instruct(cfg: Config, init_dir: Path) -> tuple[Path, Path | None]:
    """Where this setting's instruct checkpoint is cached (``--sft.instruct-cache``/<key>) and where it is found:
    there, in the checkpoints shipped with the package (``SHIPPED_INSTRUCT``), or None. Reads ``init_dir``; the
    weights it hashes are a fresh ``starting_model``, so no model of the run is touched."""
    key = instruct_key(starting_model(cfg, init_dir), init_dir, cfg)
    cache = Path(cfg.sft.instruct_cache) / key
    for where in (cache, SHIPPED_INSTRUCT / key):
        if (where / "config.json").is_file():
            return cache, where
    return cache, None


def build_instruct(cfg: Config, processor, init_dir: Path, cache: Path, device: torch.device) -> None:
    """Train the ``starting_model`` on ``instruct_examples`` and save it, with ``instruct.json`` (its settings and
    the share of true cues it names per rendering on held-out scenes), to ``cache``, written whole or not at all."""
    seed, n = cfg.sft.instruct_seed, cfg.sft.instruct_images
    scenes = instruct_scenes(n, seed=seed, image_size=cfg.data.image_size)
    examples = instruct_examples(scenes, [s.open_image() for s in scenes], seed=seed)
    print(f"[emor3] instruct stage: {len(scenes)} scenes, {len(examples)} examples, {cfg.sft.instruct_steps} steps "
          f"(cached in {cache})")
    stage = SFTConfig(steps=cfg.sft.instruct_steps, batch_size=cfg.sft.instruct_batch_size, lr=cfg.sft.instruct_lr,
                      weight_decay=cfg.sft.weight_decay)
    model = prepare_model(starting_model(cfg, init_dir, device), cfg)
    model.freeze_vision(False)  # the stage teaches the model to see, whatever --model.freeze-vision says of the run
    sft(model, processor, examples, stage, seed=seed, device=device, progress=cfg.run.progress,
        desc="instruct stage")
    k = len(INSTRUCT_STYLES)
    held_out = instruct_scenes(n + k * HELD_OUT_PER_RENDERING, seed=seed, image_size=cfg.data.image_size)[n:]
    recall = {}
    for style in INSTRUCT_STYLES:  # scenes the stage never trained on, per rendering
        part = [s for s in held_out if s.metadata["rendering"] == style.palette]
        recall[style.palette] = caption_recall(model, processor, part, [s.open_image() for s in part], device)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer_dir=init_dir)
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


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder's files (a flat folder) into a new folder ``dst``. The copies are new files of this
    run, so they get the mode any file it writes gets (0666 less the umask), not the source's (copytree would keep
    the cache's or the package's modes)."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copyfile(f, dst / f.name)


def instruct_stage(cfg: Config, run: Run, out: Path) -> Run:
    """``run`` (built from ``RUN_DIR/init``) with the instruct checkpoint of its setting as its model and source
    folder, copied to ``RUN_DIR/instruct``: built here into ``--sft.instruct-cache`` unless that cache or the
    package has it. Under torchrun rank 0 builds first (the caller runs this under ``dist.rank0_first``)."""
    run_dir = out / "instruct"
    cache, found = find_instruct(cfg, run.source_dir)
    if found is None and dist.is_main():
        # one builder per setting: a second run of the same setting waits for the first and reuses its checkpoint
        lock_folder(cache.parent, "instruct stage", wait=True, name=f".{cache.name}.lock")
        try:
            cache, found = find_instruct(cfg, run.source_dir)
            if found is None:
                build_instruct(cfg, run.processor, run.source_dir, cache, run.device)
                found = cache
            else:
                dist.print0(f"[emor3] instruct stage: reusing {found}")
        finally:
            unlock_folder(cache.parent, name=f".{cache.name}.lock")
    elif found is not None:
        dist.print0(f"[emor3] instruct stage: reusing {found}")
    if found is None:
        raise RuntimeError(f"instruct stage: {cache} missing on rank {dist.rank()} (rank 0 builds it first)")
    if dist.is_main():
        shutil.rmtree(run_dir, ignore_errors=True)
        copy_checkpoint(found, run_dir)
    meta = json.loads((run_dir / "instruct.json").read_text())
    for rendering, r in meta["caption_cue_recall"].items():
        dist.print0(f"[emor3] instruct model: describing {meta['held_out_per_rendering']} held-out scenes of the "
                    f"{rendering} rendering, it names the true face in {100 * r['face']:.0f}%, sky "
                    f"{100 * r['sky']:.0f}%, object {100 * r['object']:.0f}%")
    return dataclasses.replace(run, model=load_model(cfg, found, run.device), source_dir=run_dir)


def instruct_main(argv: list[str]) -> None:
    """python -m emor3.sft instruct [flags]: only the instruct stage of the run the same flags describe, into
    ``--sft.instruct-cache`` (built there unless a checkpoint of that setting exists) and ``RUN_DIR/instruct``."""
    cfg = parse_args(argv, "python -m emor3.sft instruct", (__doc__ or "").strip(),
                     default_out="runs/instruct")
    if not applies(cfg):
        raise SystemExit("python -m emor3.sft instruct: the instruct stage is for the tiny model built from scratch "
                         "(no --model.path) with --sft.instruct-steps > 0")
    out = prepare_run_dir(cfg, "python -m emor3.sft instruct")
    save_config(cfg, out / "config.toml")
    instruct_stage(cfg, build(cfg, out, WORLD), out)
    print(f"[emor3] instruct checkpoint: {out / 'instruct'}")
