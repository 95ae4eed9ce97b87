"""The build stage: what a run is made of, from its resolved config. Builds; runs nothing.

``build`` returns a frozen ``Run``: the model the run starts from and its processor, the training, cold-start and
evaluation data, the taxonomies of every sample and the reward setup, under ``--run.threads``.
1. Data: ``--data.train`` in any loader format (``--data.eval`` sets as NAME=PATH), else the world's own
   (``World.data``: the default run's is EmoScenes, ``emor3.toy``). Bad samples stop the run or are counted
   (``--on-bad-sample skip``) and the counts are printed before anything trains.
2. Model: ``--model.path`` (a Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder), else the folder the world
   writes (``World.model``: the default run's tiny model, ``emor3.toy.model``).
The frozen reference and LoRA adapters are made later, on the model GRPO starts from (``with_adapters``,
``reference_model``); a resumed run's policy comes from ``emor3.stages.resume``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from emor3 import distributed as dist
from emor3.config import Config, parse_eval_spec
from emor3.data import get_taxonomy, load_dataset
from emor3.data.dataset import PROMPT_TOO_LONG, EmotionDataset
from emor3.engine.prompts import drop_overlong_prompts
from emor3.folders import UsageError
from emor3.models import Processor, load_pretrained
from emor3.models.checkpoint import read_config
from emor3.models.lora import add_lora, has_lora
from emor3.models.sizes import tiny_config
from emor3.rewards import load_reward_plugin, resolve_weights


@dataclass(frozen=True)
class EvalSet:
    name: str
    samples: EmotionDataset  # samples (id, label, taxonomy, metadata) and cached images
    domain: str  # "in" | "out"


@dataclass(frozen=True)
class World:
    """What a run builds where no flag names its data or model: the default run's synthetic world (``emor3.toy``).
    ``data(cfg, asked)`` -> (train set, cold-start set or None, eval sets: those ``asked`` for by name, or the
    world's own choice when ``asked`` is None); ``model(cfg, out, taxonomies, questions)`` -> the folder the run's
    model loads from. ``splits``: the sets ``--data.eval`` may ask for by name; ``reserved``: names a user's set may
    not take; ``name``: what error messages call the world."""

    name: str
    splits: tuple[str, ...]
    reserved: tuple[str, ...]
    data: Callable
    model: Callable


@dataclass(frozen=True)
class Run:
    """What ``build`` made; the stages read it with the one resolved config they are given."""

    device: torch.device
    model: torch.nn.Module
    processor: Processor
    source_dir: Path  # folder the model, tokenizer and processor files come from (copied into every checkpoint)
    train_set: EmotionDataset
    cold_start: EmotionDataset | None  # the samples with SET responses for Cold-Start SFT, or None
    eval_sets: tuple[EvalSet, ...]
    taxonomies: dict  # name -> Taxonomy, for every sample of every set
    reward_weights: dict
    plugins: tuple


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_distributed():  # torchrun: one GPU per rank
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def set_threads(cfg: Config) -> int:
    """Apply ``--run.threads`` (0: torch's default) and return the thread count torch now uses."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------- data


def eval_requests(specs, train: str = "", world: World | None = None) -> tuple[list[str], list[str]]:
    """``--data.eval`` entries -> (the world's sets asked for by name, NAME=PATH entries). A user set may not take
    a name the world reserves (it would replace that set in results.json) nor a name given twice, and the world's
    sets are asked for only where the world builds the data (no ``--data.train``). Raises UsageError."""
    splits, files, names = [], [], []
    valid = world.splits if world is not None else ()
    reserved = world.reserved if world is not None else ()
    for spec in specs:
        if "=" not in spec:
            if spec not in valid:
                what = f"not an {world.name} split ({', '.join(valid)})" if world is not None else "not NAME=PATH"
                raise UsageError(f"--data.eval {spec}: {what}; a set of your own is NAME=PATH[:TAXONOMY][@in|@out]")
            splits.append(spec)
            names.append(spec)
            continue
        name = spec.split("=", 1)[0]
        if name in reserved:
            raise UsageError(f"--data.eval {spec}: the name {name!r} is {world.name}' built-in split; give your set "
                             f"another name, e.g. --data.eval my_{name}={spec.split('=', 1)[1]}")
        files.append(spec)
        names.append(name)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--data.eval: {', '.join(dup)} named twice; each set needs its own name (results.json "
                         "keeps one row per name)")
    if train and splits:
        raise UsageError(f"--data.eval {','.join(splits)}: {world.name}' splits are built only when {world.name} "
                         "is the training data (no --data); evaluate your own sets as NAME=PATH")
    return splits, files


def image_factor(cfg: Config) -> int:
    """Side multiple images are resized to: the vision patch times the spatial merge of the run's model (28 for
    Qwen2-VL / Qwen2.5-VL's 14-px patches, 32 for Qwen3-VL's 16-px ones), read from ``--model.path``'s config.json
    or the named size ``--model.tiny``."""
    m = cfg.model
    vision = (read_config(m.path) if m.path else tiny_config(m.tiny)).vision
    return vision.patch_size * vision.spatial_merge_size


def build_data(cfg: Config, world: World | None = None):
    """(train set, cold-start set (samples with a SET ``response`` in their metadata) or None, eval sets). Loaders
    check every image at the run's pixel budget (``--model.min-pixels`` / ``--model.max-pixels`` and the model's
    ``image_factor``), so an image the processor cannot take at that budget is reported when the data is built."""
    d, m = cfg.data, cfg.model
    budget = dict(min_pixels=m.min_pixels, max_pixels=m.max_pixels, factor=image_factor(cfg))
    asked_splits, asked_files = eval_requests(d.eval, d.train, world)
    if d.train:
        train = load_dataset(d.train, d.taxonomy or None, d.on_bad_sample, **budget)
        with_response = [i for i, s in enumerate(train.samples)
                         if isinstance(s.metadata, dict) and s.metadata.get("response")]
        cold = train.subset(with_response[: d.cold_start]) if with_response and d.cold_start > 0 else None
        evals = []
    elif world is None:
        raise UsageError("no training data: give --data.train")
    else:  # the sets asked for by name, else the world's own choice unless sets of the user's are given
        train, cold, evals = world.data(cfg, asked_splits or ([] if asked_files else None))
    for spec in asked_files:
        name, path, taxonomy, domain = parse_eval_spec(spec)
        evals.append(EvalSet(name, load_dataset(path, taxonomy, d.on_bad_sample, **budget), domain))
    for ds in [train] + [e.samples for e in evals] + ([cold] if cold is not None else []):
        ds.set_image_budget(**budget)
        if ds.report.n_skipped:
            print(f"[emor3] {ds.report.summary()}")
    return train, cold, evals


# --------------------------------------------------------------------------------------------- model


def prepare_model(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """The run's training switches on a loaded model: ``--model.freeze-vision`` (a LoRA model's base, vision tower
    included, is frozen already) and ``--model.gradient-checkpointing``."""
    if not has_lora(model):
        model.freeze_vision(cfg.model.freeze_vision)
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    return model


def load_model(cfg: Config, source: Path, device: torch.device) -> torch.nn.Module:
    """The model in ``source`` in ``--model.dtype`` on ``device``, with the run's training switches."""
    return prepare_model(load_pretrained(source, dtype=getattr(torch, cfg.model.dtype), device=device), cfg)


def build(cfg: Config, out: Path, world: World | None = None) -> Run:
    """The model the run starts from, its processor, the data and the reward setup (module docstring), from ``cfg``
    resolved (``Config.resolved``, which parsing has done already)."""
    cfg = cfg.resolved()
    set_threads(cfg)
    device = resolve_device(cfg.model.device)
    train, cold, evals = build_data(cfg, world)
    taxonomies = {}  # name -> Taxonomy, for every sample of every set (a user taxonomy comes with its dataset)
    for ds in [train] + [e.samples for e in evals]:
        if ds.taxonomy is not None:
            taxonomies.setdefault(ds.taxonomy.name, ds.taxonomy)
        for s in ds.samples:
            if s.taxonomy not in taxonomies:
                taxonomies[s.taxonomy] = get_taxonomy(s.taxonomy)
    questions = [s.question for ds in [train] + [e.samples for e in evals] for s in ds.samples
                 if getattr(s, "question", None)]
    if cfg.model.path:
        source = Path(cfg.model.path)
    elif world is None:
        raise UsageError("no model: give --model.path")
    else:
        source = world.model(cfg, out, list(taxonomies.values()), questions)
    model = load_model(cfg, source, device)
    processor = Processor.from_pretrained(source, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    m = cfg.model
    processor.set_clip_budget(fps=m.video_fps or None, max_frames=m.video_max_frames, min_pixels=m.min_pixels,
                              max_pixels=m.video_max_pixels or m.max_pixels)
    if cfg.data.max_prompt_length:  # overlong prompts are bad samples, found now, before anything trains
        limit = lambda ds: drop_overlong_prompts(ds, processor, taxonomies, cfg.data.max_prompt_length,  # noqa: E731
                                                 cfg.data.on_bad_sample)
        train, cold = limit(train), (limit(cold) if cold is not None else None)
        evals = [dataclasses.replace(e, samples=limit(e.samples)) for e in evals]
        for ds in [train] + [e.samples for e in evals]:
            if ds.report.skipped.get(PROMPT_TOO_LONG):
                print(f"[emor3] {ds.report.summary()}")
    # the datasets were checked and are resized on the model's own grid (build_data, image_factor): 28 px for
    # Qwen2-VL / Qwen2.5-VL, 32 px for Qwen3-VL; the image processor must resize on the same one
    factor = processor.image_processor.patch_size * processor.merge_size
    if factor != train.factor:
        raise ValueError(f"{source}: preprocessor_config.json resizes images to multiples of {factor} px (patch x "
                         f"merge) but config.json's vision tower to {train.factor} px; the two files disagree")
    weights = resolve_weights(cfg.reward.weights)
    if not cfg.algorithm().reflection:  # GRPO / DAPO / ... baselines: the same rule rewards, no RER terms
        weights = {k: v for k, v in weights.items() if k not in ("consistency", "coherence")}
    return Run(device, model, processor, source, train, cold, tuple(evals), taxonomies, weights,
               tuple(load_reward_plugin(spec) for spec in cfg.reward.plugins))


# --------------------------------------------------------------------------------------------- GRPO's models


def add_adapters(model: torch.nn.Module, cfg: Config) -> list[str]:
    """Fresh LoRA adapters (``--model.lora-*``, seeded by the run seed) on ``model``; every other weight frozen."""
    m = cfg.model
    return add_lora(model, rank=m.lora_rank, alpha=m.lora_alpha, targets=m.lora_targets, dropout=m.lora_dropout,
                    seed=cfg.run.seed)


def with_adapters(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """LoRA (``--model.lora-rank`` > 0): fresh adapters on the model GRPO starts from, after Cold-Start SFT has
    merged its own into the weights. A resumed run's policy has them already, from its checkpoint."""
    if cfg.model.lora_rank and not has_lora(model):
        names = add_adapters(model, cfg)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        dist.print0(f"[emor3] LoRA: rank {cfg.model.lora_rank} adapters on {len(names)} linear layers, {n:,} "
                    "trainable parameters; every other weight frozen")
    return model


def reference_model(cfg: Config, model: torch.nn.Module, source: Path, start: Path, resumed: bool,
                    device: torch.device) -> torch.nn.Module | None:
    """The frozen reference, when ``Config.needs_reference``. ``--grpo.reference sft`` (the default): a copy of
    ``model``, the policy GRPO starts from (a resumed run reloads it from ``start``: the Cold-Start checkpoint, else
    the initial model); a LoRA run keeps none: its reference is the policy with the adapters switched off
    (``emor3.models.lora.AdaptersOff``). ``init`` (the release): the model before Cold-Start SFT, read again from
    ``source``, the folder the run started from, also with LoRA."""
    init = cfg.grpo.reference == "init"
    if not cfg.needs_reference() or (has_lora(model) and not init):
        return None
    dtype = getattr(torch, cfg.model.dtype)
    if init:
        ref = load_pretrained(source, dtype=dtype, device=device)
    elif not resumed:
        ref = copy.deepcopy(model)
    else:  # the start model, whose content the resume stage compared with the run's record
        ref = load_pretrained(start, dtype=dtype, device=device)
    # frozen: it only computes, so it is held in the compute dtype (a bf16 copy next to fp32 master weights)
    compute = dist.compute_dtype(cfg.run.mixed_precision, device)
    if next(ref.parameters()).dtype.itemsize > compute.itemsize:
        ref = ref.to(compute)
    return ref.eval().requires_grad_(False)
