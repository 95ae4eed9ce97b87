"""The run folder: who may write it, what ``--overwrite`` removes, what a resume may change, what the run started from.

A command refuses a folder that is not empty unless it resumes the run in it (``--resume``) or is told to replace it
(``--overwrite``, which removes the files a run writes and nothing else), then holds its lock (``emor3.folders``: one
owner per folder, a second process refuses naming the first's PID). A resume is the same run: its settings must
equal config.toml but for ``RESUME_MAY_CHANGE`` (recorded with their step in ``changes.jsonl``), and the model it
started from, which is also its KL reference, must be the one ``lineage.json`` records by content hash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from emor3 import distributed as dist
from emor3.checkpoints import latest_checkpoint, list_checkpoints, tidy_checkpoints
from emor3.config import Config, config_from_dict, config_to_dict, load_toml, save_config, setting_name
from emor3.folders import LOCK_NAME, RunFolderError, folder_holder, lock_folder, not_a_folder
from emor3.models.checkpoint import content_hash


def start_dir(out: Path, source: Path) -> Path:
    """The model GRPO starts from: the Cold-Start checkpoint RUN_DIR/sft, else the initial model."""
    return out / "sft" if (out / "sft" / "config.json").is_file() else source


# what a run writes into its folder: the names ``--overwrite`` removes (nothing else in the folder is touched)
RUN_FILES = ("config.toml", "init", "instruct", "sft", "latest", "metrics.jsonl", "samples.jsonl",
             "baseline_results.json", "results.json", "results.md", "curves.png", "report.html", "tensorboard", "wandb",
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
    if is_main_process():
        if out.exists() and not out.is_dir():
            raise not_a_folder(out, "creating the run folder (--run.out)")
        entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
        if entries and not (resuming or cfg.run.overwrite):
            shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
            holder = folder_holder(out)
            ways = ([f"it is in use by process {holder}: wait for it to end"] if holder else []) + (
                [f"`--resume {out}` continues it"] if can_resume and list_checkpoints(out) else []) + [
                "`--overwrite` replaces it", "`--out NEW_DIR` writes elsewhere"]
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
            tidy_checkpoints(out)
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


def finished_run(cfg: Config, out: Path) -> dict | None:
    """The rows of the run that finished in ``out`` with ``cfg``'s settings (its results.json, the last file a run
    writes), else None. Settings that say how the command is run, and ``run.progress``, may differ; every other
    must equal config.toml. A command that makes many runs (benchmarks/ablation.py) goes on after a stop without
    repeating the finished ones."""
    res, conf = out / "results.json", out / "config.toml"
    if not (res.is_file() and conf.is_file()):
        return None
    how = set(_RESUME_IGNORED) | {("run", "progress")}
    if _settings_diff(config_from_dict(load_toml(conf), str(conf)), cfg, lambda k: k not in how):
        return None
    try:
        return json.loads(res.read_text())
    except json.JSONDecodeError:  # cut short while being written
        return None


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


def record_lineage(cfg: Config, out: Path, start: Path) -> dict:
    """Write RUN_DIR/lineage.json: the model GRPO starts from (``start``: the LoRA base, the baseline row) and the
    frozen KL reference (the same model, where the run uses one), each by path and ``content_hash``."""
    entry = {"path": _rel(start, out), "sha256": content_hash(start)}
    lineage = {"start_model": entry, "reference": dict(entry) if cfg.needs_reference() else None}
    if dist.is_main():
        tmp = out / f".{LINEAGE}.tmp"
        tmp.write_text(json.dumps(lineage, indent=1) + "\n")
        os.replace(tmp, out / LINEAGE)
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
