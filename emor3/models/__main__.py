"""python -m emor3.models merge ADAPTER --base PATH --out DIR

Folds a LoRA adapter folder (PEFT's format, as GRPO / SFT runs with ``--model.lora-rank`` write it, or one made by
PEFT) into its base checkpoint and writes a full Hugging Face folder (config, safetensors, tokenizer and processor
files copied from the base) that transformers and ``emor3.models.load_pretrained`` load with no adapter code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emor3.config import Dtype, choices

from .checkpoint import load_pretrained, save_pretrained
from .lora import load_adapter, merge_adapters, read_adapter_config


def merge(adapter: Path, base: Path | None, out: Path, dtype: str | None = None) -> Path:
    """Load `base` (default: the adapter config's base_model_name_or_path), add the adapter, merge, save to `out`."""
    cfg = read_adapter_config(adapter)
    if base is None:
        if not cfg.get("base_model_name_or_path"):
            raise ValueError(f"{adapter}: adapter_config.json names no base model; pass --base PATH")
        base = Path(cfg["base_model_name_or_path"])
    if Path(out).resolve() == Path(base).resolve():
        raise ValueError(f"--out {out} is the base folder; write the merged model elsewhere")
    model = load_pretrained(base, dtype=dtype)
    load_adapter(model, adapter)
    merge_adapters(model)
    save_pretrained(model, out, tokenizer_dir=base)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emor3.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model, write a Hugging Face folder")
    m.add_argument("adapter", type=Path, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--base", type=Path, default=None,
                   help="base model folder (default: base_model_name_or_path of adapter_config.json)")
    m.add_argument("--out", type=Path, required=True, help="folder to write the merged model to")
    m.add_argument("--dtype", choices=choices(Dtype), default=None,
                   help="dtype of the merged weights (default: the base checkpoint's)")
    a = p.parse_args(argv)
    try:
        out = merge(a.adapter, a.base, a.out, a.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(out)


if __name__ == "__main__":
    main()
