"""python -m emor3.models merge ADAPTER --base PATH --out DIR [--overwrite]

Folds a LoRA adapter folder (PEFT's format, as GRPO / SFT runs with ``--model.lora-rank`` write it, or one made by
PEFT) into its base checkpoint and writes a full Hugging Face folder (config, safetensors, tokenizer and processor
files copied from the base) that transformers and ``emor3.models.load_pretrained`` load with no adapter code.

It merges onto the adapter's own base only: an adapter emor3 saved records its base's content hash
(``base_fingerprint.json``) and another base is refused; for one without that record (PEFT's) the base's
architecture must be the one adapter_config.json names, and the tensor shapes must fit, with a warning that the
weights themselves cannot be checked. ``--out`` must be empty or new; ``--overwrite`` replaces the model files of a
folder (nothing else in it), never the base's own folder. The command holds ``--out``'s lock while it writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emor3.config import Dtype, choices
from emor3.folders import LOCK_NAME, RunFolderError, lock_folder, run_cli, wants_debug

from .checkpoint import TOKENIZER_FILES, content_hash, load_pretrained, read_config, save_pretrained
from .lora import BASE_FINGERPRINT, load_adapter, merge_adapters, read_adapter_config

# what a merge writes into --out: the names --overwrite replaces
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json") + TOKENIZER_FILES


def check_base(adapter: Path, base: Path, cfg: dict) -> None:
    """Refuse (RunFolderError) a base that is not the adapter's: a content hash other than the one recorded in
    ``base_fingerprint.json``, or, without that record, another architecture than adapter_config.json names."""
    record = adapter / BASE_FINGERPRINT
    if record.is_file():
        want = json.loads(record.read_text())
        got = content_hash(base)
        if got != want.get("sha256"):
            raise RunFolderError(f"merge: --base {base} is not the base {adapter} was trained over (its content hash "
                                 f"{got[:16]}... differs from {want.get('sha256', '?')[:16]}... recorded in {record}, "
                                 f"for {want.get('path')}); merge onto that model: --base {want.get('path')}")
        return
    model_type = read_config(base).model_type
    named = ((cfg.get("auto_mapping") or {}).get("base_model_class") or "").lower().replace("_", "")
    if named and model_type.replace("_", "") not in named.replace("forconditionalgeneration", ""):
        raise RunFolderError(f"merge: --base {base} is a {model_type} model, but {adapter / 'adapter_config.json'} "
                             f"names a {cfg['auto_mapping']['base_model_class']} base; merge onto that base")
    print(f"[emor3] warning: {adapter} records no fingerprint of its base ({BASE_FINGERPRINT}); only the "
          f"architecture and tensor shapes of {base} are checked, not that it is the model the adapter was trained "
          "over", file=sys.stderr)


def check_out(out: Path, base: Path, overwrite: bool) -> list[str]:
    """Refuse (RunFolderError) an ``--out`` that is the base, a file, or a folder that is not empty without
    ``overwrite``; returns what the folder holds. Reads only."""
    if out.resolve() == base.resolve():
        raise RunFolderError(f"merge: --out {out} is the base folder; write the merged model elsewhere")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"merge: --out {out} is a file; --out names the folder to write the merged model to")
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise RunFolderError(f"merge: --out {out} is not empty ({shown}); it is left as it is. --overwrite replaces "
                             "its model files, or write to a new folder")
    return entries


def take_out(out: Path, base: Path, overwrite: bool) -> None:
    """Lock ``--out`` (one writer), check it again, and remove the model files an ``overwrite`` replaces (nothing
    else in the folder)."""
    lock_folder(out, "python -m emor3.models merge")
    for name in check_out(out, base, overwrite):
        if name in _MODEL_FILES or (name.startswith("model-") and name.endswith(".safetensors")):
            (out / name).unlink()


def merge(adapter: Path, base: Path | None, out: Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Load `base` (default: the adapter config's base_model_name_or_path), add the adapter, merge, save to `out`."""
    cfg = read_adapter_config(adapter)
    if base is None:
        if not cfg.get("base_model_name_or_path"):
            raise ValueError(f"{adapter}: adapter_config.json names no base model; pass --base PATH")
        base = Path(cfg["base_model_name_or_path"])
    out, base = Path(out), Path(base)
    check_out(out, base, overwrite)  # before any work: a refusal costs nothing
    check_base(Path(adapter), base, cfg)
    model = load_pretrained(base, dtype=dtype)
    load_adapter(model, adapter)
    merge_adapters(model)
    take_out(out, base, overwrite)  # only now, with the merged model in hand, is anything in --out replaced
    save_pretrained(model, out, tokenizer_dir=base)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emor3.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model, write a Hugging Face folder")
    m.add_argument("adapter", type=Path, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--base", type=Path, default=None,
                   help="base model folder (default: base_model_name_or_path of adapter_config.json)")
    m.add_argument("--out", type=Path, required=True, help="folder to write the merged model to (new or empty)")
    m.add_argument("--overwrite", action="store_true", help="replace the model files of a folder holding some")
    m.add_argument("--dtype", choices=choices(Dtype), default=None,
                   help="dtype of the merged weights (default: the base checkpoint's)")
    m.add_argument("--debug", action="store_true", help="show the traceback of an OS error instead of one line")
    a = p.parse_args(argv)

    def run():
        try:
            return merge(a.adapter, a.base, a.out, a.dtype, a.overwrite)
        except (FileNotFoundError, ValueError) as e:
            if a.debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    print(run_cli(run, debug=wants_debug(argv)))


if __name__ == "__main__":
    main()
