"""The resume stage: the checkpoint a ``--resume`` continues from, and the policy and trainer state it holds.

``--resume RUN_DIR`` takes the newest checkpoint that loads (or ``--resume RUN_DIR/checkpoint-<step>`` the one it
names), sets the later ones aside (``checkpoint-<step>.damaged`` / ``.abandoned``: never deleted by a resume), and
prunes older ones only once it has loaded. The model the run started from must be the one ``lineage.json`` records
(``emor3.run_folder.check_lineage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from emor3.checkpoints import (CHECKPOINT_NAME, POINTER, discard, list_checkpoints, load_policy, set_aside,
                               write_pointer)
from emor3.config import Config
from emor3.folders import RunFolderError
from emor3.models.checkpoint import CheckpointError, load_torch_state
from emor3.run_folder import check_lineage, is_main_process, restart_command, start_dir
from emor3.stages.build import prepare_model


@dataclass(frozen=True)
class ResumePoint:
    model: torch.nn.Module  # the checkpoint's policy (with LoRA: the start model plus its adapters)
    checkpoint: Path
    state: dict  # the trainer state (optimizer, scheduler, RNG, step, data position), read once
    lineage: dict  # the run's lineage.json, checked


def resume(cfg: Config, out: Path, source: Path, device: torch.device) -> ResumePoint:
    """The point ``--resume`` continues from: the run's lineage checked against ``source`` (the folder the run was
    built from), then its newest checkpoint that loads (``load_resume_point``), with the run's training switches."""
    candidates = resume_candidates(cfg.run.resume, out)
    start = start_dir(out, source)
    lineage = check_lineage(out, start)
    model, checkpoint, state = load_resume_point(cfg, out, candidates, start, device)
    return ResumePoint(prepare_model(model, cfg), checkpoint, state, lineage)


def resume_candidates(resume: str, out: Path) -> list[Path]:
    """The checkpoints ``--resume`` may continue from, to try in order: ``RUN_DIR/checkpoint-<step>`` names one;
    a run folder gives all its complete checkpoints, newest first."""
    p = Path(resume)
    found = [c for _, c in list_checkpoints(out)]
    if CHECKPOINT_NAME.fullmatch(p.name) and p.resolve().parent == Path(out).resolve():
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
    (``.damaged`` or ``.abandoned``, ``set_aside``), not deleted, ``latest`` points at it, and only once it has
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
        step = int(CHECKPOINT_NAME.fullmatch(ckpt.name).group(1))
        if is_main_process():
            damaged = {c for c, _ in skipped}
            for later_step, later in list_checkpoints(out):
                if later_step > step:
                    moved = set_aside(later, "damaged" if later in damaged else "abandoned")
                    print(f"[emor3] resuming from {ckpt.name}: {later.name} set aside as {moved.name} (kept, not "
                          "resumed; --overwrite or you delete it)")
            pointer = out / POINTER
            if not pointer.is_file() or pointer.read_text().strip() != ckpt.name:
                write_pointer(out, ckpt.name)
            for _, old in list_checkpoints(out)[: -cfg.run.keep_checkpoints]:  # older than the one just loaded
                discard(old)
        return model, ckpt, state
    names = "; ".join(f"{c.name}: {r}" for c, r in skipped)
    raise RunFolderError(f"--resume {out}: no checkpoint loads ({names}). Start the run again: {restart_command(out)}")
