"""Numbered, crash-safe checkpoints of a run: ``RUN_DIR/checkpoint-<step>/`` and the pointer ``RUN_DIR/latest``.

A checkpoint holds the policy as a Hugging Face folder (``model/``; with LoRA a PEFT adapter folder ``adapter/`` over
the model GRPO started from, with that model's fingerprint) and the trainer state (optimizer, scheduler, RNG, step,
data position; ``trainer_state.pt``, loaded with weights_only). A save builds ``.checkpoint-<step>.tmp/``, syncs it
to disk, renames it into place and reads it back, then replaces the pointer file (temporary file, fsync, rename) and
deletes all but the newest ``--run.keep-checkpoints``. Every folder named ``checkpoint-<step>`` was complete when it
got its name, and the old ones go only after a newer one is in place and verified. SIGINT / SIGTERM arriving during a
save are held until it ends. What a resume picks among them is ``emor3.stages.resume``'s.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import torch

from emor3 import distributed as dist
from emor3.config import Config
from emor3.models import load_pretrained, save_pretrained
from emor3.models.checkpoint import (CheckpointError, fault_point, load_torch_state, save_torch_state,
                                     verify_safetensors, verify_torch_state)
from emor3.models.lora import has_lora, load_adapter, save_adapter


class _FullState:
    """What ``save_pretrained`` reads from a model (config, state_dict), for a state gathered from FSDP shards."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


POINTER = "latest"  # RUN_DIR/latest: the name of the newest checkpoint folder whose save finished
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step}"


def is_complete(folder: Path) -> bool:
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
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted((step, p) for step, p in found if is_complete(p))


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


def discard(path: Path) -> None:
    """Remove a folder by renaming it out of the way first, so no half-deleted folder keeps a checkpoint's name."""
    trash = path.parent / f".{path.name}.trash"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fault_point("renamed an old checkpoint away")
    shutil.rmtree(trash)
    fault_point("deleted an old checkpoint")


def set_aside(path: Path, why: str) -> Path:
    """Rename a checkpoint folder to ``<name>.<why>`` (``.damaged``, ``.abandoned``; a number is added where that
    name is taken): out of the way of resume and of pruning, deleted only by ``--overwrite`` or by hand."""
    target = path.with_name(f"{path.name}.{why}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{why}-{n}")
    os.replace(path, target)
    return target


def clean_interrupted(out: Path) -> None:
    """What an interrupted save or prune left: temporary and trash folders and a stale pointer temp file are
    removed; a ``checkpoint-<step>`` folder that is not complete (a save never leaves one: it was damaged since)
    is set aside as ``checkpoint-<step>.damaged``, never deleted."""
    for p in out.iterdir():
        if re.fullmatch(r"\.checkpoint-\d+\.(tmp|trash)", p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name == f".{POINTER}.tmp":
            p.unlink()
        elif CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and not is_complete(p):
            moved = set_aside(p, "damaged")
            print(f"[emor3] {p} is incomplete (no model/ or adapter/, or an empty trainer_state.pt): set aside as "
                  f"{moved.name}")


def tidy_checkpoints(out: Path) -> None:
    """Finish what an interrupted save left undone before resuming: remove its leftovers and point ``latest`` at
    the newest complete checkpoint. Nothing is pruned here: old checkpoints go only once a newer one has been
    written and verified (``save_checkpoint``)."""
    clean_interrupted(out)
    newest = latest_checkpoint(out)
    pointer = out / POINTER
    if newest is not None and (not pointer.is_file() or pointer.read_text().strip() != newest.name):
        write_pointer(out, newest.name)


def verify_checkpoint(folder: Path, step: int) -> None:
    """A checkpoint just written reads back: its files are all there, its trainer state opens (memory-mapped)
    and holds ``step``, and its weights' headers open. Raises CheckpointError naming what is wrong."""
    if not is_complete(folder):
        raise CheckpointError(f"{folder}: incomplete right after it was written (files missing)")
    state = verify_torch_state(folder / "trainer_state.pt")
    if state.get("step") != step:
        raise CheckpointError(f"{folder / 'trainer_state.pt'}: holds step {state.get('step')}, expected {step}")
    for f in sorted(folder.glob("*/*.safetensors")):
        verify_safetensors(f)


def write_pointer(out: Path, name: str) -> None:
    tmp = out / f".{POINTER}.tmp"
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    fault_point("wrote the pointer's temporary file")
    os.replace(tmp, out / POINTER)
    fault_point("renamed the pointer")
    _fsync(out)


def save_checkpoint(model: torch.nn.Module, out: Path, step: int, optimizer, scheduler, data_state: dict, *,
                    keep: int, tokenizer_dir: Path, base: Path, base_sha256: str | None) -> Path:
    """Write RUN_DIR/checkpoint-<step> (module docstring), point RUN_DIR/latest at it, keep the newest ``keep``;
    returns the folder. ``tokenizer_dir``: the folder whose tokenizer and processor files go with the weights;
    ``base`` (with its content hash ``base_sha256``): the model a LoRA checkpoint's adapters apply to.

    Under torchrun every rank calls this (gathering the full model and optimizer state is a collective) and rank 0
    writes. The optimizer state is keyed by parameter name (``distributed.full_optimizer_state``), so a checkpoint
    written by N ranks loads on M."""
    out, final = Path(out), checkpoint_dir(out, step)
    model_state = dist.full_model_state(model)
    optim_state = dist.full_optimizer_state(model, optimizer)
    if dist.is_main():
        with signals_deferred():
            clean_interrupted(out)
            tmp = out / f".{final.name}.tmp"
            tmp.mkdir(parents=True)
            fault_point("created the temporary folder")
            if has_lora(model):  # the adapters alone; the base is the model GRPO started from
                base = Path(base).resolve()
                fingerprint = {"path": str(base), "sha256": base_sha256} if base_sha256 else None
                save_adapter(model, tmp / "adapter", state=model_state, base_model_name_or_path=str(base),
                             base_fingerprint=fingerprint)
            else:
                save_pretrained(_FullState(model.config, model_state), tmp / "model", tokenizer_dir=tokenizer_dir)
            save_torch_state({
                "step": step, "data": data_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "world_size": dist.world_size(),
            }, tmp / "trainer_state.pt")
            _fsync_tree(tmp)
            fault_point("synced the temporary folder")
            if final.exists():  # this step saved before (a rerun of it): the new one, complete, replaces it
                discard(final)
            os.replace(tmp, final)
            fault_point("renamed the checkpoint into place")
            _fsync(out)
            verify_checkpoint(final, step)  # nothing older goes unless this one reads back
            write_pointer(out, final.name)
            for _, old in list_checkpoints(out)[:-keep]:
                discard(old)
    dist.barrier("saving a checkpoint")  # nobody reads or resumes before rank 0 has finished writing
    return final


def load_trainer_state(state: dict | Path, optimizer, scheduler, model) -> dict:
    """Restore optimizer (keyed by parameter name, so any world size loads it), scheduler and RNG state from a
    trainer state (or the checkpoint folder holding it); returns the trainer state."""
    if not isinstance(state, dict):
        state = load_torch_state(Path(state) / "trainer_state.pt")
    dist.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def load_policy(cfg: Config, checkpoint: Path, base: Path, device: torch.device) -> torch.nn.Module:
    """The policy a checkpoint holds: the whole model (``model/``), or with LoRA the base (the model GRPO started
    from) plus the checkpoint's adapters (``adapter/``, a PEFT adapter folder)."""
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.lora_rank:
        model = load_pretrained(base, dtype=dtype, device=device)
        load_adapter(model, checkpoint / "adapter")
        return model
    return load_pretrained(checkpoint / "model", dtype=dtype, device=device)


