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
   (``--resume``) or is told to replace it (``--overwrite``, which removes the files a run writes and nothing else).
5. Checkpoints: ``RUN_DIR/checkpoint-<step>/`` holds the policy as a Hugging Face folder (``model/``; with LoRA a
   PEFT adapter folder ``adapter/`` over the model GRPO started from) and the trainer state (optimizer, scheduler, RNG, step, data position; ``trainer_state.pt``, loaded with weights_only).
   A save builds ``.checkpoint-<step>.tmp/``, syncs it to disk and renames it into place, then replaces the pointer
   file ``RUN_DIR/latest`` (temporary file, fsync, rename) and deletes all but the newest ``--run.keep-checkpoints``.
   There is always one complete checkpoint: every folder named ``checkpoint-<step>`` was complete when it got its
   name, and the old ones go only after the new one is in place. SIGINT / SIGTERM arriving during a save are held
   until it ends. Resume takes the newest complete ``checkpoint-<step>`` (the pointer's, or the one after it when a
   crash fell between the rename and the pointer), and the next save removes what an interrupted one left behind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emor3 import distributed as dist
from emor3.config import Config
from emor3.data import get_taxonomy, load_dataset
from emor3.data.dataset import PROMPT_TOO_LONG
from emor3.data.emoscenes import (CUE_QUESTIONS, DESCRIBE_QUESTION, SPLITS, corpus_texts, eval_split_names,
                                  load_emoscenes)
from emor3.engine.prompts import drop_overlong_prompts, sample_prompt, set_prompt
from emor3.models import Processor, load_pretrained, save_pretrained
from emor3.models.checkpoint import read_config
from emor3.models.lora import add_lora, has_lora, load_adapter, save_adapter
from emor3.models.checkpoint import fault_point, load_torch_state, save_torch_state
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
    TAXONOMY is what follows the path's last ':' when it holds no path separator (a name such as binary, or a
    TOML/JSON file in the working folder)."""
    if "=" not in spec:
        raise ValueError(f"--data.eval entry {spec!r}: expected NAME=PATH[:TAXONOMY][@in|@out]")
    name, rest = spec.split("=", 1)
    domain = "out"
    if rest.endswith("@in") or rest.endswith("@out"):
        rest, domain = rest.rsplit("@", 1)
    taxonomy = None
    head, sep, tail = rest.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        rest, taxonomy = head, tail
    return name, rest, taxonomy, domain


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
    if d.train:
        train = load_dataset(d.train, d.taxonomy or None, d.on_bad_sample, **budget)
        with_response = [i for i, s in enumerate(train.samples) if isinstance(s.metadata, dict) and s.metadata.get("response")]
        cold = train.subset(with_response[: d.cold_start]) if with_response and d.cold_start > 0 else None
        evals = []
    else:
        splits = load_emoscenes(d.cache_dir, seed=cfg.run.seed, n_train=d.emoscenes_train, n_test=d.emoscenes_test,
                                n_ood=d.emoscenes_ood, image_size=d.image_size, label_noise=d.label_noise,
                                n_coldstart=d.cold_start, variant=d.emoscenes_variant, on_bad_sample=d.on_bad_sample)
        train = splits["train"]
        cold = splits.get("coldstart")
        evals = [EvalSet(name, splits[name], SPLITS[name].domain)
                 for name in eval_split_names(d.emoscenes_eval, d.emoscenes_variant) if name in splits]
    for spec in d.eval:
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
    """The model (resumed from ``--resume``'s newest complete checkpoint if given), processor, data and reward
    setup of a run, under ``--run.threads``. The reference is attached later (``attach_reference``), once
    Cold-Start SFT has run. The run holds ``cfg`` resolved (``Config.resolved``), what every stage reads."""
    cfg = cfg.resolved()
    set_threads(cfg)
    device = resolve_device(cfg.model.device)
    resume_dir = None
    if cfg.run.resume:
        resume_dir = latest_checkpoint(Path(cfg.run.resume))
        if resume_dir is None:
            raise FileNotFoundError(f"--resume {cfg.run.resume}: no complete checkpoint in it (a checkpoint-<step>/ "
                                    "folder with model/ or adapter/ and trainer_state.pt)")
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
    if resume_dir is not None:
        model = load_policy(cfg, resume_dir, start_dir(out, source), device)
    if not has_lora(model):  # a LoRA model's base, vision tower included, is frozen already
        model.freeze_vision(cfg.model.freeze_vision)
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    weights = resolve_weights(cfg.reward.weights)
    if not cfg.algorithm().reflection:  # GRPO / DAPO / ... baselines: the same rule rewards, no RER terms
        weights = {k: v for k, v in weights.items() if k not in ("consistency", "coherence")}
    return Experiment(cfg, device, model, processor, source, train, cold, evals, taxonomies,
                      reward_weights=weights, plugins=[load_reward_plugin(spec) for spec in cfg.reward.plugins],
                      resume_dir=resume_dir)


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
    else:
        ref_dir = out / "sft" if (out / "sft").is_dir() else exp.source_dir
        ref = load_pretrained(ref_dir, dtype=getattr(torch, cfg.model.dtype), device=exp.device)
    # frozen: it only computes, so it is held in the compute dtype (a bf16 copy next to fp32 master weights)
    dtype = dist.compute_dtype(cfg.run.mixed_precision, exp.device)
    if next(ref.parameters()).dtype.itemsize > dtype.itemsize:
        ref = ref.to(dtype)
    exp.reference = ref.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- the run folder

# what a run writes into its folder: the names ``--overwrite`` removes (nothing else in the folder is touched)
RUN_FILES = ("config.toml", "init", "instruct", "sft", "latest", "metrics.jsonl", "samples.jsonl", "baseline_results.json",
             "results.json", "results.md", "curves.png", "report.html", "tensorboard", "wandb")
_RUN_PATTERNS = re.compile(r"checkpoint-\d+|\.checkpoint-\d+\.(tmp|trash)|\.latest\.tmp")


class RunFolderError(RuntimeError):
    """A command was pointed at a folder holding another run; the message says which flag to use."""


def _is_main_process() -> bool:
    """Rank 0, also before the process group exists (torchrun sets RANK)."""
    return dist.is_main() if dist.is_distributed() else int(os.environ.get("RANK", "0")) == 0


def prepare_run_dir(cfg: Config, command: str, *, can_resume: bool = False) -> Path:
    """The rule every entry point applies before it writes anything: ``cfg.run.out`` must be empty (or absent),
    or be the run being resumed (``--resume``, where ``can_resume``), or ``--overwrite`` must be given, which
    removes the files a run writes (``RUN_FILES``, checkpoints) and nothing else. Creates the folder. Rank 0 alone
    checks and clears (under torchrun a failing rank 0 stops the job)."""
    out = Path(cfg.run.out)
    resuming = bool(cfg.run.resume) and can_resume
    if _is_main_process() and out.is_dir() and not resuming:
        entries = sorted(p.name for p in out.iterdir())
        if entries and not cfg.run.overwrite:
            shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
            ways = ([f"`--resume {out}` continues it"] if can_resume else []) + [
                f"`--overwrite` replaces it", "`--out NEW_DIR` writes elsewhere"]
            raise RunFolderError(f"{command}: the run folder {out} is not empty ({shown}); it is left as it is. "
                                 + "; ".join(ways) + ".")
        ours = [n for n in entries if n in RUN_FILES or _RUN_PATTERNS.fullmatch(n)]
        if ours:
            print(f"[emor3] --overwrite: removing {', '.join(ours)} from {out}")
        for name in ours:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if resuming:
        if latest_checkpoint(out) is None:
            raise FileNotFoundError(f"--resume {out}: no complete checkpoint in it (a checkpoint-<step>/ folder with "
                                    "model/ or adapter/ and trainer_state.pt)")
        if _is_main_process():
            _tidy_checkpoints(out, cfg.run.keep_checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    return out


def exit_on_run_folder_error(fn, *args):
    """Call ``fn(*args)``; a RunFolderError ends the process with its message and exit status 2 (a usage error)."""
    try:
        return fn(*args)
    except RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


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


def _clean_interrupted(out: Path) -> None:
    """What an interrupted save or prune left: temporary and trash folders, a stale pointer temp file, and
    ``checkpoint-<step>`` folders that are not complete."""
    for p in out.iterdir():
        if re.fullmatch(r"\.checkpoint-\d+\.(tmp|trash)", p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name == f".{POINTER}.tmp":
            p.unlink()
        elif _CHECKPOINT.fullmatch(p.name) and p.is_dir() and not _is_complete(p):
            print(f"[emor3] removing {p}: an incomplete checkpoint left by an interrupted save")
            shutil.rmtree(p)


def _tidy_checkpoints(out: Path, keep: int) -> None:
    """Finish what an interrupted save left undone before resuming: remove its leftovers, point ``latest`` at the
    newest complete checkpoint and keep the newest ``keep``."""
    _clean_interrupted(out)
    newest = latest_checkpoint(out)
    pointer = out / POINTER
    if newest is not None and (not pointer.is_file() or pointer.read_text().strip() != newest.name):
        _write_pointer(out, newest.name)
    for _, old in list_checkpoints(out)[:-keep]:
        _discard(old)


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
                save_adapter(exp.model, tmp / "adapter", state=model_state,
                             base_model_name_or_path=str(start_dir(out, exp.source_dir).resolve()))
            else:
                save_pretrained(_FullState(exp.model.config, model_state), tmp / "model", tokenizer_dir=exp.source_dir)
            save_torch_state({
                "step": step, "data": data_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "world_size": dist.world_size(),
            }, tmp / "trainer_state.pt")
            _fsync_tree(tmp)
            fault_point("synced the temporary folder")
            if final.exists():  # this step saved before (a rerun of it): the new one replaces it
                _discard(final)
            os.replace(tmp, final)
            fault_point("renamed the checkpoint into place")
            _fsync(out)
            _write_pointer(out, final.name)
            for _, old in list_checkpoints(out)[: -exp.cfg.run.keep_checkpoints]:
                _discard(old)
    dist.barrier("saving a checkpoint")  # nobody reads or resumes before rank 0 has finished writing
    return final


def load_trainer_state(resume_dir: Path, optimizer, scheduler, model) -> dict:
    """Restore optimizer (keyed by parameter name, so any world size loads it), scheduler and RNG state. A
    "generator" entry (written by earlier versions; nothing samples from it) is ignored."""
    state = load_torch_state(resume_dir / "trainer_state.pt")
    dist.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state
