"""Hugging Face checkpoint folders <-> QwenVL / Qwen3VL (chosen by config.json's model_type).

`load_pretrained(path, dtype, device)`:
  - config.json in the transformers 4.x (published) or 5.x layout (see `config.py`, `config_qwen3_vl.py`);
  - weights from `model.safetensors` or a sharded `model.safetensors.index.json`;
  - both key layouts: published (`model.layers.*`, `model.embed_tokens.*`, `visual.*`, `lm_head.weight`) and
    transformers-5 native (`model.language_model.*`, `model.visual.*`, `lm_head.weight`);
  - the module is built on the meta device and materialised straight in the target dtype/device, then every
    tensor is read one at a time with `safe_open` and copied in: peak memory is the model plus one tensor, never
    a full fp32 copy;
  - a missing or unexpected tensor (or a shape mismatch) is an error that lists them all. A stored
    `lm_head.weight` in a tied checkpoint is accepted only if it equals the embedding.
`save_pretrained(model, path, tokenizer_dir=None, max_shard_bytes=None)` writes the published layout (what the
Qwen releases ship and what transformers 4.x and 5.x both load: `model.layers.*` / `visual.*` for Qwen2-VL and
Qwen2.5-VL, `model.language_model.*` / `model.visual.*` for Qwen3-VL), a config.json in the published layout, optional
shards with an index, and copies tokenizer / processor files along. Every file is written to a temporary name
and renamed into place (atomic per file), with the mode a plain `open()` would give it (0666 less the umask).

A damaged file is never a bare library error: a safetensors file or index that cannot be read raises
`CheckpointError` naming the file and what to do. `save_torch_state(obj, path)` / `load_torch_state(path)` are
the atomic `torch.save` and the `torch.load(weights_only=True)` for non-tensor state (optimizer, RNG, step), with
the same errors for a missing, empty, truncated or non-weights-only file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emor3.config import Dtype, choices

from .config import QwenVLConfig
from .config_qwen3_vl import Qwen3VLConfig, parse_config
from .qwen3_vl import Qwen3VL
from .qwen_vl import QwenVL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json", "generation_config.json")
_DTYPES = {name: getattr(torch, name) for name in choices(Dtype)}  # the names --model.dtype accepts


class CheckpointError(ValueError):
    """A checkpoint file that is missing, empty or damaged; the message names the file and what to do."""


def _damaged(path: Path, problem: str, remedy: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}. {remedy}")


_REMEDY_WEIGHTS = ("The file is damaged or incomplete (an interrupted download, copy or save): download or copy it "
                   "again, or save the model again")


def _open_safetensors(file: Path):
    """safe_open with the library's header/format errors turned into a CheckpointError naming the file."""
    try:
        if file.stat().st_size == 0:
            raise _damaged(file, "is empty (0 bytes)", _REMEDY_WEIGHTS)
        return safe_open(file, framework="pt", device="cpu")
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise _damaged(file, "does not exist", _REMEDY_WEIGHTS) from None
    except Exception as e:  # safetensors raises SafetensorError / OSError for bad headers and short files
        raise _damaged(file, f"is not a readable safetensors file ({type(e).__name__}: {e})",
                       _REMEDY_WEIGHTS) from None


def _get_tensor(f, file: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as e:  # a file cut short after a valid header fails only when the tensor is read
        raise _damaged(file, f"tensor {key!r} cannot be read ({type(e).__name__}: {e})", _REMEDY_WEIGHTS) from None


def check_finite(t: torch.Tensor, file: Path, key: str) -> None:
    """A floating-point tensor read from ``file`` holds only finite numbers, else a CheckpointError naming it: a
    NaN weight would otherwise surface steps later as an unrelated error (an index out of range in sampling)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise _damaged(file, f"tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}",
                       "The weights were saved from a diverged run or damaged: use an earlier checkpoint")


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint folder's contents: config.json and every weight file (safetensors and index), names
    and bytes, in name order. Tokenizer files are left out: the weights and their shapes are what a run depends on."""
    path = Path(path)
    names = ["config.json"] + sorted(p.name for p in path.iterdir()
                                     if p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json")
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        with open(path / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def verify_safetensors(file: Path) -> None:
    """The header of a safetensors file opens and names its tensors (a CheckpointError otherwise)."""
    with _open_safetensors(Path(file)) as f:
        list(f.keys())


def canonical_key(key: str) -> str:
    """Map a stored tensor name (either layout) to our parameter name (= the published layout)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def published_key(name: str, model_type: str) -> str:
    """Our parameter name -> the key the published checkpoints of `model_type` store it under."""
    if model_type == "qwen3_vl":
        if name.startswith("model."):
            return "model.language_model." + name[len("model."):]
        if name.startswith("visual."):
            return "model." + name
    return name


def build_model(cfg: QwenVLConfig | Qwen3VLConfig) -> QwenVL:
    """The model class for a parsed config (on the current default device, uninitialised weights)."""
    return Qwen3VL(cfg) if isinstance(cfg, Qwen3VLConfig) else QwenVL(cfg)


def read_config(path: str | os.PathLike) -> QwenVLConfig | Qwen3VLConfig:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no config.json in checkpoint folder")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e
    return parse_config(d, source=str(f))


def _weight_files(path: Path) -> dict[str, list[str]]:
    """{file: [stored keys]} for a single-file or sharded checkpoint."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _damaged(index, f"is not a valid safetensors index ({type(e).__name__}: {e})",
                           _REMEDY_WEIGHTS) from None
        files: dict[str, list[str]] = {}
        for k, fn in wm.items():
            files.setdefault(fn, []).append(k)
        for fn in files:
            if not (path / fn).is_file():
                raise FileNotFoundError(f"{index}: shard {fn} is missing")
        return files
    if single.is_file():
        with _open_safetensors(single) as f:
            return {"model.safetensors": list(f.keys())}
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu") -> QwenVL:
    """Build QwenVL from a Hugging Face folder. dtype None = the checkpoint's `torch_dtype`, else float32."""
    path = Path(path)
    cfg = read_config(path)
    raw = json.loads((path / "config.json").read_text())
    if dtype is None:
        dtype = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("dtype") or "float32"
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)  # storage in the target dtype/device, uninitialised
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected, mismatched, extra_head = [], [], None
    for fn, keys in _weight_files(path).items():
        with _open_safetensors(path / fn) as f:
            for k in keys:
                name = canonical_key(k)
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    extra_head = (fn, k)  # checked against the embedding once that is loaded
                    continue
                if name not in params:
                    unexpected.append(k)
                    continue
                t = _get_tensor(f, path / fn, k)
                p = params[name]
                check_finite(t, path / fn, k)
                if t.shape != p.shape:
                    mismatched.append(f"{k}: stored {tuple(t.shape)} vs model {tuple(p.shape)}")
                    continue
                with torch.no_grad():
                    p.copy_(t)  # converts dtype / device per tensor
                seen.add(name)
                del t
    missing = sorted(set(params) - seen)
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing}, unexpected "
                         f"{sorted(unexpected)}, shape mismatches {mismatched}")
    if extra_head is not None:
        with _open_safetensors(path / extra_head[0]) as f:
            head = _get_tensor(f, path / extra_head[0], extra_head[1])
        if not torch.equal(head.to(dtype).to(device), model.model.embed_tokens.weight.detach()):
            raise ValueError(f"{path}: tie_word_embeddings is true but the stored lm_head.weight differs from "
                             "model.embed_tokens.weight; set tie_word_embeddings false to keep it")
    return model


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_fault_calls = 0
_fault_matches: dict[str, int] = {}


def fault_point(what: str) -> None:
    """A crash-test hook, called after each file write and rename of a save; it does nothing unless the
    environment asks. ``EMOR3_FAULT_LOG=FILE`` appends ``what`` to FILE (to count and name the points);
    ``EMOR3_FAULT_AT=N`` makes the process kill itself with SIGKILL (no cleanup, as a power cut or the OOM killer)
    at its Nth call; ``EMOR3_FAULT_AT=N:TEXT`` at the Nth call whose ``what`` contains TEXT (``SFT step``,
    ``evaluated set``). ``make check-faults`` runs a save killed at a seeded sample of these points."""
    global _fault_calls
    at, log = os.environ.get("EMOR3_FAULT_AT"), os.environ.get("EMOR3_FAULT_LOG")
    if not (at or log):
        return
    _fault_calls += 1
    if log:
        with open(log, "a") as fh:
            fh.write(f"{_fault_calls}\t{what}\n")
    if not at:
        return
    n, _, text = at.partition(":")
    if text:
        if text in what:
            _fault_matches[text] = _fault_matches.get(text, 0) + 1
            if _fault_matches[text] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
    elif _fault_calls == int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_write(target: Path, write) -> None:
    """Write `target` through a temporary file beside it, then rename it into place (atomic on POSIX).

    The file gets the mode any newly created file gets, 0666 less the umask (0644 under the usual 022), not
    mkstemp's 0600."""
    target = Path(target)
    mode = 0o666 & ~_umask()
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # a name clash with another writer: draw another name
            continue
    os.close(fd)
    try:
        fault_point(f"created the temporary file of {target.name}")
        write(str(tmp))
        fault_point(f"wrote the temporary file of {target.name}")
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with their own mode
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # on disk before it takes the target's name
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fault_point(f"renamed {target.name}")
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch_state(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` atomically (a crash leaves the old file or the new one, never half of one)."""
    _atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def verify_torch_state(path: str | os.PathLike) -> Any:
    """``load_torch_state`` memory-mapped: the file's structure is read and checked, its tensors are not copied
    into memory (a check after a save that costs little for a large optimizer state)."""
    path = Path(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as e:  # any failure to read back is a damaged file
        raise _damaged(path, f"the trainer state file does not read back ({type(e).__name__}: {e})",
                       "The save was damaged (a full disk, a failing disk): free space and resume") from None


def load_torch_state(path: str | os.PathLike, what: str = "trainer state") -> Any:
    """`torch.load(path, weights_only=True, map_location="cpu")`, with every failure a CheckpointError naming the
    file, the problem (missing, empty, truncated, holding objects that weights_only refuses) and what to do."""
    path = Path(path)
    remedy = (f"The {what} file is damaged or was cut short (a crash or a full disk while saving): resume from "
              "another checkpoint, or start the run again without resuming")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _damaged(path, f"the {what} file does not exist", remedy) from None
    if size == 0:
        raise _damaged(path, f"the {what} file is empty (0 bytes)", remedy)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        refused = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        if refused:  # a well-formed pickle of objects other than tensors and plain containers
            raise _damaged(path, f"the {what} file holds Python objects that a weights_only load refuses "
                           f"({refused[0]})", "emor3 never loads arbitrary pickles; the state must hold only "
                           "tensors, numbers, strings, lists and dicts") from None
        raise _damaged(path, f"the {what} file cannot be read (not a torch.save file: "
                       f"{str(e).splitlines()[-1] if str(e) else type(e).__name__})", remedy) from None
    except (EOFError, RuntimeError, OSError, ValueError) as e:  # torch's zip reader: truncated or not a zip
        raise _damaged(path, f"the {what} file cannot be read ({type(e).__name__}: {e})", remedy) from None


def save_pretrained(model: QwenVL, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                    max_shard_bytes: int | None = None) -> None:
    """Write config.json + safetensors (published key layout) + tokenizer/processor files from tokenizer_dir."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mt = model.config.model_type
    sd = {published_key(k, mt): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    dtype = next(iter(sd.values())).dtype
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    _atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
    # shards: greedy in parameter order
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if (path / stale).exists():
            (path / stale).unlink()
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic_write(path / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata=meta))
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            _atomic_write(path / fn, lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
            weight_map.update({k: fn for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write(path / "model.safetensors.index.json",
                      lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        if src.resolve() != path.resolve():
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    _atomic_write(path / name, lambda tmp, s=src / name: shutil.copyfile(s, tmp))
