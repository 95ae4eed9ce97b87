"""What a run is made of, built from its Config: model and processor, datasets, reward setup, frozen reference.

Shared by ``python -m emor3.grpo.train``, ``python -m emor3.sft`` and ``python -m emor3.evaluate``; building runs
nothing (no training, no evaluation): the entry points run the stages on what it builds.
1. Data: ``--data.train`` in any loader format, or EmoScenes generated from the run's seed (train; the final table's
   test in-domain and compositional, ood_render, ood_unseen out-of-domain, or with ``--data.emoscenes-eval
   validation`` the validation split alone; ood_emotion6 and ood_binary are drawn but not evaluated:
   emor3.data.emoscenes says why; cold-start traces). Bad samples stop the run or are counted
   (``--on-bad-sample skip``) and the counts are printed before anything trains.
2. Model: ``--model.path`` (a Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder), else a tiny model built offline
   into ``RUN_DIR/init`` with a tokenizer trained on the EmoScenes corpus and the prompts the run will use.
3. The frozen reference (``attach_reference``: the model GRPO starts from, i.e. after Cold-Start SFT) when β > 0 or
   the reference judges RER.
4. The run folder (``prepare_run_dir``): a command refuses a folder that is not empty unless it resumes the run in it
   (``--resume``) or is told to replace it (``--overwrite``, which removes the files a run writes and nothing else),
   then holds its lock (``emor3.folders``: one owner per folder, a second process refuses naming the first's PID).
   A resume is the same run: its settings must equal config.toml but for ``RESUME_MAY_CHANGE`` (recorded with their
   step in ``changes.jsonl``), and the model it started from, which is also its KL reference, must be the one
   ``lineage.json`` records by content hash.
5. Checkpoints: ``RUN_DIR/checkpoint-<step>/`` holds the policy as a Hugging Face folder (``model/``; with LoRA a
   PEFT adapter folder ``adapter/`` over the model GRPO started from, with that model's fingerprint) and the trainer
   state (optimizer, scheduler, RNG, step, data position; ``trainer_state.pt``, loaded with weights_only).
   A save builds ``.checkpoint-<step>.tmp/``, syncs it to disk, renames it into place and reads it back, then
   replaces the pointer file ``RUN_DIR/latest`` (temporary file, fsync, rename) and deletes all but the newest
   ``--run.keep-checkpoints``. Every folder named ``checkpoint-<step>`` was complete when it got its name, and the
   old ones go only after a newer one is in place and verified. SIGINT / SIGTERM arriving during a save are held
   until it ends. Resume takes the newest checkpoint that loads (``load_resume_point``; or the one named by
   ``--resume RUN_DIR/checkpoint-<step>``), sets the later ones aside (``checkpoint-<step>.damaged`` /
   ``.abandoned``: never deleted by a resume), and prunes older ones only once it has loaded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emor3 import distributed as dist
from emor3.config import Config, config_from_dict, config_to_dict, load_toml, save_config, setting_name
from emor3.data import get_taxonomy, load_dataset
from emor3.data.dataset import PROMPT_TOO_LONG
from emor3.data.emoscenes import (CUE_QUESTIONS, DESCRIBE_QUESTION, SPLITS, corpus_texts, eval_split_names,
                                  load_emoscenes)
from emor3.data.emoscenes_clips import eval_split_names as clip_eval_split_names
from emor3.data.emoscenes_clips import load_emoscenes_clips, split_domain as clip_split_domain
from emor3.engine.prompts import drop_overlong_prompts, sample_prompt, set_prompt
from emor3.models import Processor, load_pretrained, save_pretrained
from emor3.folders import LOCK_NAME, RunFolderError, UsageError, folder_holder, lock_folder, not_a_folder
from emor3.models.checkpoint import (CheckpointError, content_hash, fault_point, load_torch_state, read_config,
                                     save_torch_state, verify_safetensors, verify_torch_state)
from emor3.models.lora import add_lora, has_lora, load_adapter, save_adapter
from emor3.models.tiny import build_tiny_checkpoint, tiny_config
from emor3.rewards import load_reward_plugin, resolve_weights
from emor3.rewards.reflection import COHERENCE_INSTRUCTION, COHERENCE_QUESTION, CONSISTENCY_QUESTION


@dataclass
class EvalSet:
    name: str
    samples: object  # an emor3.data.EmotionDataset: samples (id, label, taxonomy, metadata) and cached images
    domain: str  # "in" | "out"


@dataclass
class Experiment:
    cfg: Config
    device: torch.device
    model: torch.nn.Module
    processor: Processor
    source_dir: Path  # folder the tokenizer and processor files come from (copied into every checkpoint)
    train_set: object = None
    cold_start: object = None  # the samples with SET responses for Cold-Start SFT (an EmotionDataset), or None
    eval_sets: list = field(default_factory=list)
    taxonomies: dict = field(default_factory=dict)
    reference: torch.nn.Module | None = None
    reward_weights: dict = field(default_factory=dict)
    plugins: list = field(default_factory=list)
    resume_dir: Path | None = None
    resume_state: dict | None = None  # the resumed checkpoint's trainer state, read once when it was checked
    lineage: dict | None = None  # the content hashes of the start model and the reference (``record_lineage``)

    def prompt_text(self, sample) -> str:
        return sample_prompt(sample, self.taxonomies)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_distributed():  # torchrun: one GPU per rank
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


# --------------------------------------------------------------------------------------------- data


def _parse_eval_spec(spec: str) -> tuple[str, str, str | None, str]:
    """NAME=PATH[:TAXONOMY][@in|@out] -> (name, path, taxonomy or None, domain); domain defaults to out.
    A PATH that exists is taken whole, ':' included; otherwise TAXONOMY is what follows the last ':' when it holds
    no path separator (a name such as binary, or a TOML/JSON file in the working folder)."""
    if "=" not in spec:
        raise ValueError(f"--data.eval entry {spec!r}: expected NAME=PATH[:TAXONOMY][@in|@out]")
    name, rest = spec.split("=", 1)
    domain = "out"
    if (rest.endswith("@in") or rest.endswith("@out")) and not Path(rest).exists():
        rest, domain = rest.rsplit("@", 1)
    taxonomy = None
    head, sep, tail = rest.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail and not Path(rest).exists():
        rest, taxonomy = head, tail
    return name, rest, taxonomy, domain


# names a user's evaluation set may not take: EmoScenes' splits (``--data.eval test`` asks for that split)
RESERVED_EVAL_NAMES = tuple(SPLITS) + ("coldstart",)


def eval_requests(specs, train: str = "") -> tuple[list[str], list[str]]:
    """``--data.eval`` entries -> (EmoScenes splits asked for by name, NAME=PATH entries). A user set may not
    take a split's name (it would replace the split in results.json) nor a name given twice, and splits are asked
    for only where EmoScenes is built (no ``--data.train``). Raises UsageError."""
    splits, files, names = [], [], []
    for spec in specs:
        if "=" not in spec:
            if spec not in SPLITS or spec == "train" or not (SPLITS[spec].in_table or SPLITS[spec].selection):
                valid = ", ".join(n for n, sp in SPLITS.items() if n != "train" and (sp.in_table or sp.selection))
                raise UsageError(f"--data.eval {spec}: not an EmoScenes split ({valid}); a set of your own is "
                                 "NAME=PATH[:TAXONOMY][@in|@out]")
            splits.append(spec)
            names.append(spec)
            continue
        name = spec.split("=", 1)[0]
        if name in RESERVED_EVAL_NAMES:
            raise UsageError(f"--data.eval {spec}: the name {name!r} is EmoScenes' built-in split; give your set "
                             f"another name, e.g. --data.eval my_{name}={spec.split('=', 1)[1]}")
        files.append(spec)
        names.append(name)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--data.eval: {', '.join(dup)} named twice; each set needs its own name (results.json "
                         "keeps one row per name)")
    if train and splits:
        raise UsageError(f"--data.eval {','.join(splits)}: EmoScenes' splits are built only when EmoScenes is the "
                         "training data (no --data); evaluate your own sets as NAME=PATH")
    return splits, files


def image_factor(cfg: Config) -> int:
    """Side multiple images are resized to: the vision patch times the spatial merge of the run's model (28 for
    Qwen2-VL / Qwen2.5-VL's 14-px patches, 32 for Qwen3-VL's 16-px ones), read from ``--model.path``'s config.json
    or the tiny configuration."""
    m = cfg.model
    vision = (read_config(m.path) if m.path else tiny_config(m.tiny)).vision
    return vision.patch_size * vision.spatial_merge_size


def build_data(cfg: Config):
    """(train set, cold-start set (samples with a SET ``response`` in their metadata) or None, eval sets). Loaders
    check every image at the run's pixel budget (``--model.min-pixels`` / ``--model.max-pixels`` and the model's
    ``image_factor``), so an image the processor cannot take at that budget is reported when the data is built."""
    d, m = cfg.data, cfg.model
    budget = dict(min_pixels=m.min_pixels, max_pixels=m.max_pixels, factor=image_factor(cfg))
    asked_splits, asked_files = eval_requests(d.eval, d.train)
    if d.train:
        train = load_dataset(d.train, d.taxonomy or None, d.on_bad_sample, **budget)
        with_response = [i for i, s in enumerate(train.samples) if isinstance(s.metadata, dict) and s.metadata.get("response")]
        cold = train.subset(with_response[: d.cold_start]) if with_response and d.cold_start > 0 else None
        evals = []
    else:
        clips = d.emoscenes_variant == "clips"  # the clip benchmark (emor3.data.emoscenes_clips)
        load = load_emoscenes_clips if clips else functools.partial(load_emoscenes, variant=d.emoscenes_variant)
        splits = load(d.cache_dir, seed=cfg.run.seed, n_train=d.emoscenes_train, n_test=d.emoscenes_test,
                      n_ood=d.emoscenes_ood, image_size=d.image_size, label_noise=d.label_noise,
                      n_coldstart=d.cold_start, on_bad_sample=d.on_bad_sample)
        train = splits["train"]
        cold = splits.get("coldstart")
        # the sets asked for: EmoScenes' splits by name, else --data.emoscenes-eval's unless sets of the user's
        # are given
        names = asked_splits or ([] if asked_files else clip_eval_split_names(d.emoscenes_eval) if clips else
                                 eval_split_names(d.emoscenes_eval, d.emoscenes_variant))
        missing = [n for n in asked_splits if n not in splits]
        if missing:
            raise UsageError(f"--data.eval {','.join(missing)}: not built in this run (a size of 0, or a split of "
                             "another --data.emoscenes-variant)")
        evals = [EvalSet(name, splits[name], clip_split_domain(name) if clips else SPLITS[name].domain)
                 for name in SPLITS if name in names and name in splits]
    for spec in asked_files:
        name, path, taxonomy, domain = _parse_eval_spec(spec)
        evals.append(EvalSet(name, load_dataset(path, taxonomy, d.on_bad_sample, **budget), domain))
    for ds in [train] + [e.samples for e in evals] + ([cold] if cold is not None else []):
        ds.set_image_budget(**budget)
        if ds.report.n_skipped:
            print(f"[emor3] {ds.report.summary()}")
    return train, cold, evals


# --------------------------------------------------------------------------------------------- model


def tokenizer_corpus(taxonomies, questions=()) -> list[str]:
    """Texts the tiny tokenizer is trained on: EmoScenes traces and cue words, every prompt the run will send
    (``questions``: the samples' own questions, ``Sample.question``, where they have one)."""
    texts = corpus_texts() + [CONSISTENCY_QUESTION, COHERENCE_QUESTION, DESCRIBE_QUESTION]
    texts += [q for q, _ in CUE_QUESTIONS.values()]
    for tax in taxonomies:
        texts.append(set_prompt(tax))
        texts.append(COHERENCE_INSTRUCTION.replace("{labels}", ", ".join(tax.labels)))
    texts += sorted({q for q in questions if q})
    return texts


def build_model(cfg: Config, out: Path, device: torch.device, taxonomies, questions=()) -> tuple[torch.nn.Module, Path]:
    m = cfg.model
    dtype = getattr(torch, m.dtype)
    if m.path:
        source = Path(m.path)
    elif (out / "instruct" / "config.json").is_file():  # a resumed run: the instruct stage's model (emor3.sft)
        source = out / "instruct"
    else:
        source = out / "init"
        if not (source / "config.json").is_file():
            build_tiny_checkpoint(source, tokenizer_corpus(taxonomies, questions), name=m.tiny, seed=cfg.run.seed,
                                  vocab_size=m.tokenizer_vocab, image_pixels=m.max_pixels)
    return load_pretrained(source, dtype=dtype, device=device), source


def set_threads(cfg: Config) -> int:
    """Apply ``--run.threads`` (0: torch's default) and return the thread count torch now uses."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    return torch.get_num_threads()


def build_experiment(cfg: Config, out: Path) -> Experiment:
    """The model (with ``--resume``: the run's checkpoint that ``load_resume_point`` picks, over the start model
    ``check_lineage`` verified), processor, data and reward setup of a run, under ``--run.threads``. The reference is
    attached later (``attach_reference``), once Cold-Start SFT has run. The run holds ``cfg`` resolved
    (``Config.resolved``), what every stage reads."""
    cfg = cfg.resolved()
    set_threads(cfg)
    device = resolve_device(cfg.model.device)
    resume_dir = state = lineage = None
    candidates = resume_candidates(cfg.run.resume, out) if cfg.run.resume else []
    train, cold, evals = build_data(cfg)
    taxonomies = {}  # name -> Taxonomy, for every sample of every set (a user taxonomy comes with its dataset)
    for ds in [train] + [e.samples for e in evals]:
        if ds.taxonomy is not None:
            taxonomies.setdefault(ds.taxonomy.name, ds.taxonomy)
        for s in ds.samples:
            if s.taxonomy not in taxonomies:
                taxonomies[s.taxonomy] = get_taxonomy(s.taxonomy)

    questions = [s.question for ds in [train] + [e.samples for e in evals] for s in ds.samples
                 if getattr(s, "question", None)]
    model, source = build_model(cfg, out, device, list(taxonomies.values()), questions)
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
    if candidates:  # the run's own start model, then its newest checkpoint that loads (or the one named)
        lineage = check_lineage(out, start_dir(out, source))
        model, resume_dir, state = load_resume_point(cfg, out, candidates, start_dir(out, source), device)
    if not has_lora(model):  # a LoRA model's base, vision tower included, is frozen already
        model.freeze_vision(cfg.model.freeze_vision)
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    weights = resolve_weights(cfg.reward.weights)
    if not cfg.algorithm().reflection:  # GRPO / DAPO / ... baselines: the same rule rewards, no RER terms
        weights = {k: v for k, v in weights.items() if k not in ("consistency", "coherence")}
    return Experiment(cfg, device, model, processor, source, train, cold, evals, taxonomies,
                      reward_weights=weights, plugins=[load_reward_plugin(spec) for spec in cfg.reward.plugins],
                      resume_dir=resume_dir, resume_state=state, lineage=lineage)


def start_dir(out: Path, source: Path) -> Path:
    """The model GRPO starts from: the Cold-Start checkpoint RUN_DIR/sft, else the initial model."""
    return out / "sft" if (out / "sft" / "config.json").is_file() else source


def add_adapters(model: torch.nn.Module, cfg: Config) -> list[str]:
    """Fresh LoRA adapters (``--model.lora-*``, seeded by the run seed) on ``model``; every other weight frozen."""
    m = cfg.model
    return add_lora(model, rank=m.lora_rank, alpha=m.lora_alpha, targets=m.lora_targets, dropout=m.lora_dropout,
                    seed=cfg.run.seed)


def load_policy(cfg: Config, checkpoint: Path, base: Path, device: torch.device) -> torch.nn.Module:
    """The policy a checkpoint holds: the whole model (``model/``), or with LoRA the base (the model GRPO started
    from) plus the checkpoint's adapters (``adapter/``, a PEFT adapter folder)."""
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.lora_rank:
        model = load_pretrained(base, dtype=dtype, device=device)
        load_adapter(model, checkpoint / "adapter")
        return model
    return load_pretrained(checkpoint / "model", dtype=dtype, device=device)


def attach_adapters(exp: Experiment) -> None:
    """LoRA (``--model.lora-rank`` > 0): fresh adapters on the model GRPO starts from, after Cold-Start SFT has
    merged its own into the weights. A resumed run has them already, from its checkpoint."""
    if exp.cfg.model.lora_rank and not has_lora(exp.model):
        names = add_adapters(exp.model, exp.cfg)
        n = sum(p.numel() for p in exp.model.parameters() if p.requires_grad)
        dist.print0(f"[emor3] LoRA: rank {exp.cfg.model.lora_rank} adapters on {len(names)} linear layers, {n:,} "
              "trainable parameters; every other weight frozen")


def attach_reference(exp: Experiment, out: Path) -> None:
    """The frozen reference, when β > 0 or the reference judges RER. ``--grpo.reference sft`` (the default): a copy
    of the model GRPO starts from (a resumed run reloads it: the Cold-Start checkpoint, else the initial model); a
    LoRA run keeps none: its reference is the policy with the adapters switched off
    (``emor3.models.lora.AdaptersOff``). ``init`` (the release): the model before Cold-Start SFT, read again from
    the folder the run started from (``exp.source_dir``: ``--model.path``, or the tiny model's instruct stage), also
    with LoRA."""
    cfg, algo = exp.cfg, exp.cfg.algorithm()
    init = cfg.grpo.reference == "init"
    needed = algo.kl_coef > 0 or (algo.reflection and cfg.reward.judge == "reference")
    if not needed or (has_lora(exp.model) and not init):
        return
    if init:
        ref = load_pretrained(exp.source_dir, dtype=getattr(torch, cfg.model.dtype), device=exp.device)
    elif exp.resume_dir is None:
        ref = copy.deepcopy(exp.model)
    else:  # the start model, whose content ``check_lineage`` compared with the run's record
        ref = load_pretrained(start_dir(out, exp.source_dir), dtype=getattr(torch, cfg.model.dtype), device=exp.device)
    # frozen: it only computes, so it is held in the compute dtype (a bf16 copy next to fp32 master weights)
    dtype = dist.compute_dtype(cfg.run.mixed_precision, exp.device)
    if next(ref.parameters()).dtype.itemsize > dtype.itemsize:
        ref = ref.to(dtype)
    exp.reference = ref.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- the run folder

# what a run writes into its folder: the names ``--overwrite`` removes (nothing else in the folder is touched)
RUN_FILES = ("config.toml", "init", "instruct", "sft", "latest", "metrics.jsonl", "samples.jsonl", "baseline_results.json",
             "results.json", "results.md", "curves.png", "report.html", "tensorboard", "wandb",
             "lineage.json", "changes.jsonl")
_RUN_PATTERNS = re.compile(r"checkpoint-\d+|\.checkpoint-\d+\.(tmp|trash)|\.latest\.tmp|"
                           r"checkpoint-\d+\.(damaged|abandoned)(-\d+)?")

# settings a resumed run may change, because they change nothing it computes (``check_resume_settings``); a
# change is recorded in RUN_DIR/changes.jsonl with the step it took effect. Every other setting is the run's own.
RESUME_MAY_CHANGE = (("grpo", "steps"), ("run", "progress"), ("run", "logger"), ("run", "threads"),
                     ("run", "keep_checkpoints"), ("run", "save_every"), ("run", "sample_every"), ("data", "eval"),
                     ("data", "emoscenes_eval"), ("eval", "batch_size"), ("data", "cache_dir"),
                     ("sft", "instruct_cache"), ("run", "dist_timeout"), ("run", "dist_setup_timeout"))
# settings that say how this command is run, not what the run is
_RESUME_IGNORED = (("run", "resume"), ("run", "out"), ("run", "overwrite"), ("run", "dry_run"),
                   ("run", "dry_run_world"))


def is_main_process() -> bool:
    """Rank 0, also before the process group exists (torchrun sets RANK)."""
    return dist.is_main() if dist.is_distributed() else int(os.environ.get("RANK", "0")) == 0


def restart_command(out: Path) -> str:
    """A command that starts the run in ``out`` again from scratch, with the settings it was started with."""
    return f"python -m emor3.grpo.train --config {out / 'config.toml'} --overwrite"


def new_run_command(out: Path) -> str:
    """Commands that start a new run from the weights of the newest checkpoint in ``out`` (a LoRA checkpoint's
    adapter is merged into its base first), for settings a resume may not change."""
    ckpt = latest_checkpoint(out)
    if ckpt is not None and (ckpt / "model").is_dir():
        return f"python -m emor3.grpo.train --model {ckpt / 'model'} --sft.steps 0 --out NEW_DIR [settings]"
    adapter = ckpt / "adapter" if ckpt is not None else out / "checkpoint-N" / "adapter"
    return (f"python -m emor3.models merge {adapter} --out MERGED_DIR, then python -m emor3.grpo.train --model "
            "MERGED_DIR --sft.steps 0 --out NEW_DIR [settings]")


def prepare_run_dir(cfg: Config, command: str, *, can_resume: bool = False) -> Path:
    """The rule every entry point applies before it writes anything: ``cfg.run.out`` must be empty (or absent),
    or be the run being resumed (``--resume``, where ``can_resume``), or ``--overwrite`` must be given, which
    removes the files a run writes (``RUN_FILES``, checkpoints) and nothing else. A folder refused is left as it
    is, byte for byte. Otherwise the command takes the folder's lock (``emor3.folders.lock_folder``: a second
    process refuses, naming this one's PID) and creates it. A resume must keep the run's settings
    (``check_resume_settings``). Rank 0 alone checks, locks and clears (under torchrun a failing rank 0 stops the
    job)."""
    out = Path(cfg.run.out)
    resuming = bool(cfg.run.resume) and can_resume
    eval_requests(cfg.data.eval, cfg.data.train)  # refused settings are refused before a file is touched
    if is_main_process():
        if out.exists() and not out.is_dir():
            raise not_a_folder(out, "creating the run folder (--run.out)")
        entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
        if entries and not (resuming or cfg.run.overwrite):
            shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
            holder = folder_holder(out)
            ways = ([f"it is in use by process {holder}: wait for it to end"] if holder else []) + (
                [f"`--resume {out}` continues it"] if can_resume and list_checkpoints(out) else []) + [
                f"`--overwrite` replaces it", "`--out NEW_DIR` writes elsewhere"]
            raise RunFolderError(f"{command}: the run folder {out} is not empty ({shown}); it is left as it is. "
                                 + "; ".join(ways) + ".")
        lock_folder(out, command)
        if resuming:
            if not list_checkpoints(out):
                raise RunFolderError(
                    f"--resume {out}: no complete checkpoint in it (a checkpoint-<step>/ folder with model/ or "
                    "adapter/ and trainer_state.pt): the run stopped before its first save. Start it again: "
                    + (restart_command(out) if (out / "config.toml").is_file() else
                       f"python -m emor3.grpo.train --out {out} --overwrite"))
            check_resume_settings(cfg, out)
            _tidy_checkpoints(out)
        else:
            ours = [n for n in entries if n in RUN_FILES or _RUN_PATTERNS.fullmatch(n)]
            if ours:
                print(f"[emor3] --overwrite: removing {', '.join(ours)} from {out}")
            for name in ours:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _settings_diff(saved: Config, cfg: Config, keys) -> list[tuple[str, str, object, object]]:
    """(section, field, saved value, new value) for every field in ``keys`` (a predicate) that differs."""
    a, b = config_to_dict(saved.resolved()), config_to_dict(cfg.resolved())
    return [(sec, k, a[sec][k], b[sec][k]) for sec in a for k in a[sec]
            if a[sec][k] != b[sec][k] and keys((sec, k))]


def _saved_config(out: Path) -> Config:
    path = out / "config.toml"
    if not path.is_file():
        raise RunFolderError(f"--resume {out}: {path} is missing, so the run's settings are unknown. Start the run "
                             f"again: python -m emor3.grpo.train --out {out} --overwrite")
    return config_from_dict(load_toml(path), str(path))


def check_resume_settings(cfg: Config, out: Path) -> None:
    """A resumed run is the same run: every setting that changes what it computes must equal the run's
    config.toml; ``RESUME_MAY_CHANGE`` lists those that may differ. Raises RunFolderError with the differences."""
    saved = _saved_config(out)
    diff = _settings_diff(saved, cfg, lambda k: k not in RESUME_MAY_CHANGE and k not in _RESUME_IGNORED)
    if not diff:
        return
    lines = [f"  {setting_name(sec, k)}: {a!r} in the run, {b!r} now" for sec, k, a, b in diff]
    may = ", ".join("--" + ".".join(k).replace("_", "-") for k in RESUME_MAY_CHANGE)
    raise RunFolderError(
        f"--resume {out}: settings differ from the run's ({out / 'config.toml'}); a resumed run keeps its own:\n"
        + "\n".join(lines) + f"\nResume it as it is: python -m emor3.grpo.train --resume {out} (only {may} may "
        f"change). For other settings start a new run from its weights: {new_run_command(out)}")


def record_resume_changes(cfg: Config, out: Path, step: int) -> list[dict]:
    """Append the allowed changes of a resumed run (``RESUME_MAY_CHANGE``) to RUN_DIR/changes.jsonl with the step
    they take effect at, and write the settings the run now has to config.toml (without ``--resume``: the file
    describes the run, and ``--config RUN_DIR/config.toml`` must start it afresh). Returns the records."""
    saved = _saved_config(out)
    records = [{"step": step, "setting": "--" + f"{sec}.{k}".replace("_", "-"), "was": a, "now": b}
               for sec, k, a, b in _settings_diff(saved, cfg, lambda key: key in RESUME_MAY_CHANGE)]
    if records:
        with open(out / "changes.jsonl", "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        for r in records:
            print(f"[emor3] from step {step}: {r['setting']} {r['was']!r} -> {r['now']!r} (RUN_DIR/changes.jsonl)")
    save_config(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume="")), out / "config.toml")
    return records


# --------------------------------------------------------------------------------------------- lineage

LINEAGE = "lineage.json"  # RUN_DIR/lineage.json: what the run started from, by content hash


def _rel(path: Path, out: Path) -> str:
    """``path`` relative to the run folder when inside it (so a copied run folder stays valid), else absolute."""
    path, out = Path(path).resolve(), Path(out).resolve()
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)


def record_lineage(exp: Experiment, out: Path) -> dict:
    """Write RUN_DIR/lineage.json: the model GRPO starts from (the LoRA base, the baseline row) and the frozen KL
    reference (the same model, where the run uses one), each by path and ``content_hash``."""
    start = start_dir(out, exp.source_dir)
    entry = {"path": _rel(start, out), "sha256": content_hash(start)}
    algo = exp.cfg.algorithm()
    uses_ref = algo.kl_coef > 0 or (algo.reflection and exp.cfg.reward.judge == "reference")
    lineage = {"start_model": entry, "reference": dict(entry) if uses_ref else None}
    if dist.is_main():
        tmp = out / f".{LINEAGE}.tmp"
        tmp.write_text(json.dumps(lineage, indent=1) + "\n")
        os.replace(tmp, out / LINEAGE)
    exp.lineage = lineage
    return lineage


def check_lineage(out: Path, start: Path) -> dict:
    """A resumed run starts from the model and reference its run recorded: refuses (RunFolderError) when the
    record, or a model it names, is missing or has other contents, or when the run would now start from another
    folder (``start``)."""
    path = out / LINEAGE
    if not path.is_file():
        raise RunFolderError(f"--resume {out}: {path} is missing, so the model the run started from and its KL "
                             f"reference cannot be checked. Start the run again: {restart_command(out)}")
    lineage = json.loads(path.read_text())
    for what, entry in (("starting model", lineage.get("start_model")), ("KL reference", lineage.get("reference"))):
        if entry is None:
            continue
        folder = out / entry["path"]  # an absolute path stays itself
        if not (folder / "config.json").is_file():
            raise RunFolderError(f"--resume {out}: the run's {what} {folder} is missing (sha256 {entry['sha256'][:16]}"
                                 f"... in {path}); put it back, or start a new run from the run's weights: "
                                 f"{new_run_command(out)}")
        if folder.resolve() != Path(start).resolve():
            raise RunFolderError(f"--resume {out}: the run's {what} is {folder}, but this resume would start from "
                                 f"{start}; put {folder} back as it was, or start a new run from the run's weights: "
                                 f"{new_run_command(out)}")
        digest = content_hash(folder)
        if digest != entry["sha256"]:
            raise RunFolderError(f"--resume {out}: the run's {what} {folder} has changed since the run started "
                                 f"(sha256 {digest[:16]}..., recorded {entry['sha256'][:16]}... in {path}); put "
                                 f"the original back, or start a new run from the run's weights: "
                                 f"{new_run_command(out)}")
    return lineage


# --------------------------------------------------------------------------------------------- checkpoints


class _FullState:
    """What ``save_pretrained`` reads from a model (config, state_dict), for a state gathered from FSDP shards."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


POINTER = "latest"  # RUN_DIR/latest: the name of the newest checkpoint folder whose save finished
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step}"


def _is_complete(folder: Path) -> bool:
    """A trainer state and a policy: a model folder (``model/``) or a LoRA adapter folder (``adapter/``)."""
    model, adapter, state = folder / "model", folder / "adapter", folder / "trainer_state.pt"
    has_model = (model / "config.json").is_file() and (
        (model / "model.safetensors").is_file() or (model / "model.safetensors.index.json").is_file())
    has_adapter = (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    return state.is_file() and state.stat().st_size > 0 and (has_model or has_adapter)


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The complete ``checkpoint-<step>`` folders of a run, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return sorted((step, p) for step, p in found if _is_complete(p))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run (what ``--resume`` continues from), or None."""
    found = list_checkpoints(out)
    return found[-1][1] if found else None


@contextlib.contextmanager
def signals_deferred(signals=(signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT / SIGTERM until the block ends, then deliver them to the handlers that were installed: a Ctrl-C
    (first or second) during a save never leaves it half done. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in held:
            signal.raise_signal(s)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and folder under ``root`` (and ``root``) to disk, folders after their contents."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _discard(path: Path) -> None:
    """Remove a folder by renaming it out of the way first, so no half-deleted folder keeps a checkpoint's name."""
    trash = path.parent / f".{path.name}.trash"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fault_point("renamed an old checkpoint away")
    shutil.rmtree(trash)
    fault_point("deleted an old checkpoint")


def _set_aside(path: Path, why: str) -> Path:
    """Rename a checkpoint folder to ``<name>.<why>`` (``.damaged``, ``.abandoned``; a number is added where that
    name is taken): out of the way of resume and of pruning, deleted only by ``--overwrite`` or by hand."""
    target = path.with_name(f"{path.name}.{why}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{why}-{n}")
    os.replace(path, target)
    return target


def _clean_interrupted(out: Path) -> None:
    """What an interrupted save or prune left: temporary and trash folders and a stale pointer temp file are
    removed; a ``checkpoint-<step>`` folder that is not complete (a save never leaves one: it was damaged since)
    is set aside as ``checkpoint-<step>.damaged``, never deleted."""
    for p in out.iterdir():
        if re.fullmatch(r"\.checkpoint-\d+\.(tmp|trash)", p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name == f".{POINTER}.tmp":
            p.unlink()
        elif _CHECKPOINT.fullmatch(p.name) and p.is_dir() and not _is_complete(p):
            moved = _set_aside(p, "damaged")
            print(f"[emor3] {p} is incomplete (no model/ or adapter/, or an empty trainer_state.pt): set aside as "
                  f"{moved.name}")


def _tidy_checkpoints(out: Path) -> None:
    """Finish what an interrupted save left undone before resuming: remove its leftovers and point ``latest`` at
    the newest complete checkpoint. Nothing is pruned here: old checkpoints go only once a newer one has been
    written and verified (``save_checkpoint``)."""
    _clean_interrupted(out)
    newest = latest_checkpoint(out)
    pointer = out / POINTER
    if newest is not None and (not pointer.is_file() or pointer.read_text().strip() != newest.name):
        _write_pointer(out, newest.name)


def resume_candidates(resume: str, out: Path) -> list[Path]:
    """The checkpoints ``--resume`` may continue from, to try in order: ``RUN_DIR/checkpoint-<step>`` names one;
    a run folder gives all its complete checkpoints, newest first."""
    p = Path(resume)
    found = [c for _, c in list_checkpoints(out)]
    if _CHECKPOINT.fullmatch(p.name) and p.resolve().parent == Path(out).resolve():
        if p.resolve() not in [c.resolve() for c in found]:
            have = ", ".join(c.name for c in found) or "none"
            raise RunFolderError(f"--resume {p}: not a complete checkpoint of {out} (complete: {have}); resume "
                                 f"the newest with --resume {out}")
        return [p]
    if not found:
        raise RunFolderError(f"--resume {resume}: no complete checkpoint in it; start it again: {restart_command(out)}")
    return found[::-1]


def load_resume_point(cfg: Config, out: Path, candidates: list[Path], base: Path, device: torch.device):
    """(policy, checkpoint, trainer state) of the first of ``candidates`` whose trainer state and weights load
    (finite, complete). A damaged one is skipped, named; the checkpoints after the one resumed from are set aside
    (``.damaged`` or ``.abandoned``, ``_set_aside``), not deleted, ``latest`` points at it, and only once it has
    loaded are the older ones beyond ``--run.keep-checkpoints`` pruned. A checkpoint named
    with ``--resume RUN_DIR/checkpoint-<step>`` that does not load is an error naming the others."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in candidates:
        try:
            state = load_torch_state(ckpt / "trainer_state.pt")
            model = load_policy(cfg, ckpt, base, device)
        except (CheckpointError, ValueError, FileNotFoundError) as e:
            reason = str(e).splitlines()[0]
            if len(candidates) == 1 and Path(cfg.run.resume).name == ckpt.name:
                others = ", ".join(f"--resume {c}" for _, c in list_checkpoints(out) if c != ckpt) or "none"
                raise RunFolderError(f"--resume {ckpt}: it does not load ({reason}). Other checkpoints: {others}; "
                                     f"or start again: {restart_command(out)}") from None
            print(f"[emor3] --resume: skipping {ckpt.name}, it does not load: {reason}")
            skipped.append((ckpt, reason))
            continue
        step = int(_CHECKPOINT.fullmatch(ckpt.name).group(1))
        if is_main_process():
            damaged = {c for c, _ in skipped}
            for later_step, later in list_checkpoints(out):
                if later_step > step:
                    moved = _set_aside(later, "damaged" if later in damaged else "abandoned")
                    print(f"[emor3] resuming from {ckpt.name}: {later.name} set aside as {moved.name} (kept, not "
                          "resumed; --overwrite or you delete it)")
            pointer = out / POINTER
            if not pointer.is_file() or pointer.read_text().strip() != ckpt.name:
                _write_pointer(out, ckpt.name)
            for _, old in list_checkpoints(out)[: -cfg.run.keep_checkpoints]:  # older than the one just loaded
                _discard(old)
        return model, ckpt, state
    names = "; ".join(f"{c.name}: {r}" for c, r in skipped)
    raise RunFolderError(f"--resume {out}: no checkpoint loads ({names}). Start the run again: {restart_command(out)}")


def verify_checkpoint(folder: Path, step: int) -> None:
    """A checkpoint just written reads back: its files are all there, its trainer state opens (memory-mapped)
    and holds ``step``, and its weights' headers open. Raises CheckpointError naming what is wrong."""
    if not _is_complete(folder):
        raise CheckpointError(f"{folder}: incomplete right after it was written (files missing)")
    state = verify_torch_state(folder / "trainer_state.pt")
    if state.get("step") != step:
        raise CheckpointError(f"{folder / 'trainer_state.pt'}: holds step {state.get('step')}, expected {step}")
    for f in sorted(folder.glob("*/*.safetensors")):
        verify_safetensors(f)


def _write_pointer(out: Path, name: str) -> None:
    tmp = out / f".{POINTER}.tmp"
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    fault_point("wrote the pointer's temporary file")
    os.replace(tmp, out / POINTER)
    fault_point("renamed the pointer")
    _fsync(out)


def save_checkpoint(exp: Experiment, out: Path, step: int, optimizer, scheduler, data_state: dict) -> Path:
    """Write RUN_DIR/checkpoint-<step> (module docstring, 5), point RUN_DIR/latest at it, keep the newest
    ``--run.keep-checkpoints``; returns the folder.

    Under torchrun every rank calls this (gathering the full model and optimizer state is a collective) and rank 0
    writes. The optimizer state is keyed by parameter name (``distributed.full_optimizer_state``), so a checkpoint
    written by N ranks loads on M."""
    out, final = Path(out), checkpoint_dir(out, step)
    model_state = dist.full_model_state(exp.model)
    optim_state = dist.full_optimizer_state(exp.model, optimizer)
    if dist.is_main():
        with signals_deferred():
            _clean_interrupted(out)
            tmp = out / f".{final.name}.tmp"
            tmp.mkdir(parents=True)
            fault_point("created the temporary folder")
            if has_lora(exp.model):  # the adapters alone; the base is the model GRPO started from
                base = start_dir(out, exp.source_dir).resolve()
                fingerprint = {"path": str(base), "sha256": exp.lineage["start_model"]["sha256"]} \
                    if exp.lineage else None
                save_adapter(exp.model, tmp / "adapter", state=model_state, base_model_name_or_path=str(base),
                             base_fingerprint=fingerprint)
            else:
                save_pretrained(_FullState(exp.model.config, model_state), tmp / "model", tokenizer_dir=exp.source_dir)
            save_torch_state({
                "step": step, "data": data_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "world_size": dist.world_size(),
            }, tmp / "trainer_state.pt")
            _fsync_tree(tmp)
            fault_point("synced the temporary folder")
            if final.exists():  # this step saved before (a rerun of it): the new one, complete, replaces it
                _discard(final)
            os.replace(tmp, final)
            fault_point("renamed the checkpoint into place")
            _fsync(out)
            verify_checkpoint(final, step)  # nothing older goes unless this one reads back
            _write_pointer(out, final.name)
            for _, old in list_checkpoints(out)[: -exp.cfg.run.keep_checkpoints]:
                _discard(old)
    dist.barrier("saving a checkpoint")  # nobody reads or resumes before rank 0 has finished writing
    return final


def load_trainer_state(state: dict | Path, optimizer, scheduler, model) -> dict:
    """Restore optimizer (keyed by parameter name, so any world size loads it), scheduler and RNG state from a
    trainer state (or the checkpoint folder holding it). A "generator" entry (a sampling generator
    that checkpoints once carried and nothing reads) is ignored."""
    if not isinstance(state, dict):
        state = load_torch_state(Path(state) / "trainer_state.pt")
    dist.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state
