"""LoRA in pure PyTorch for QwenVL, saved and loaded as a PEFT adapter folder.

LoRA (Hu et al. 2021, eq. 3): a frozen linear layer y = x W^T + b gets a trainable low-rank update,
    y = x W^T + b + s * B(A(dropout(x))),   A: (r, in), B: (out, r), s = alpha / r (alpha / sqrt(r) with rsLoRA),
A uniform(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5), as nn.Linear and PEFT), B zero, so a fresh
adapter leaves the model unchanged. The sum is computed as PEFT's `lora.Linear` does: x is cast to the adapter
dtype (float32 by default, PEFT's `autocast_adapter_dtype`), the base output is promoted by the addition, and the
result is cast back to the base output's dtype.

How it sits in the model:
  - `add_lora` swaps each targeted `nn.Linear` for a `LoRALinear` that holds the *same* weight and bias Parameters
    (no copy; the state-dict keys `...q_proj.weight` / `.bias` are unchanged) plus `lora_A` / `lora_B`, and freezes
    every other parameter of the model, so an optimizer over `requires_grad` parameters trains only the adapters.
  - `adapters_disabled(model)` switches every adapter off: the frozen KL reference is the base model with the
    adapters off, with no second copy of the weights.
  - Targets: the decoder's `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj` (any subset), and optionally
    `vision` (every linear layer of the vision blocks) and `merger` (the patch merger's MLP).

PEFT's folder (checked against peft 0.17-0.21 on transformers 5.x's Qwen2_5_VLForConditionalGeneration):
  - `adapter_model.safetensors`: `base_model.model.<transformers module name>.lora_A.weight` (r, in) and
    `.lora_B.weight` (out, r); the transformers 5.x module names are `model.language_model.layers.N...` for the
    decoder and `model.visual...` for the vision tower (our `model.layers.N...` / `visual...`).
  - `adapter_config.json`: `peft_type` "LORA", `r`, `lora_alpha`, `lora_dropout`, `use_rslora`, and
    `target_modules` as a regex that PEFT full-matches against module names. A list of suffixes such as
    ["q_proj", "down_proj"] would also hit the Qwen2.5-VL vision blocks' `mlp.down_proj`, so the regex names the
    decoder layers explicitly.
`load_adapter` reads such a folder (ours or PEFT's) onto a model: which modules get adapters comes from the tensor
names, rank from their shapes, alpha from the config. `merge_adapters` folds W + s * B A into the base weights and
puts plain `nn.Linear` back (`python -m emor3.models merge`).

Shape legend: n tokens (any leading dims), i in_features, o out_features, r rank.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from emor3.config import DECODER_TARGETS, parse_targets

from .checkpoint import canonical_key, check_finite

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# what the adapter was trained over: the base folder's path and content hash (``checkpoint.content_hash``); read by
# ``python -m emor3.models merge`` to refuse another base. Not a PEFT file: PEFT ignores it.
BASE_FINGERPRINT = "base_fingerprint.json"
PEFT_PREFIX = "base_model.model."
_HF_CLASS = {"qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"),
             "qwen2_vl": ("Qwen2VLForConditionalGeneration", "transformers.models.qwen2_vl.modeling_qwen2_vl"),
             "qwen3_vl": ("Qwen3VLForConditionalGeneration", "transformers.models.qwen3_vl.modeling_qwen3_vl")}


class LoRALinear(nn.Linear):
    """An nn.Linear (sharing the wrapped layer's weight and bias Parameters) plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, *, rslora: bool = False,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight and bias are the wrapped layer's, not new ones
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.rslora = int(rank), float(alpha), bool(rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.enabled = True
        device = base.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)  # weight (r, i)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)  # weight (o, r)
        if device.type != "meta":
            with torch.no_grad():
                bound = 1.0 / math.sqrt(self.in_features)
                a = torch.rand(self.lora_A.weight.shape, generator=generator) * (2 * bound) - bound  # (r, i)
                self.lora_A.weight.copy_(a)
                self.lora_B.weight.zero_()

    @property
    def dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def forward(self, x: Tensor) -> Tensor:
        result = super().forward(x)  # (n, o) in the base dtype
        if not self.enabled:
            return result
        xa = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(xa))) * self.scaling  # (n, o) in the adapter dtype
        return (result + update).to(result.dtype)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """s * B A (o, i) in float32: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, dropout={self.dropout_p:g}{', rslora' if self.rslora else ''}")


# ----------------------------------------------------------------------------------------------- targets
def target_module_names(model: nn.Module, targets) -> list[str]:
    """Our names of the linear layers that `targets` select, in module order."""
    targets = parse_targets(targets)
    decoder = set(t for t in targets if t in DECODER_TARGETS)
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in decoder:
            names.append(name)
        elif name.startswith("visual.blocks.") and "vision" in targets:
            names.append(name)
        elif name.startswith(("visual.merger.", "visual.deepstack_merger_list.")) and "merger" in targets:
            names.append(name)
    if not names:
        raise ValueError(f"LoRA targets {list(targets)} select no linear layer of the model")
    return names


def hf_module_name(name: str) -> str:
    """Our module name -> transformers 5.x's (the names PEFT sees on Qwen2(.5)-VLForConditionalGeneration)."""
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name.startswith("visual."):
        return "model." + name
    return name


def _peft_target_regex(names: list[str]) -> str:
    """A regex over transformers module names that full-matches exactly `names` (our names), for target_modules:
    each name with its layer / block index generalised to \\d+ (every layer gets the same targets)."""
    pats = dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(hf_module_name(n))) for n in names)
    return "|".join(f"(?:{p})" for p in pats)


# ----------------------------------------------------------------------------------------------- apply / switch
def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{our module name: LoRALinear} of a model with adapters (empty without)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def _wrap(model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float, rslora: bool,
          dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in names:  # module order, so the same seed gives the same adapters
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        _set_module(model, name, LoRALinear(base, rank, alpha, dropout, rslora=rslora, dtype=dtype, generator=g))


def _freeze_base(model: nn.Module) -> None:
    adapters = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)


def add_lora(model: nn.Module, *, rank: int, alpha: float, targets=DECODER_TARGETS, dropout: float = 0.0,
             rslora: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[str]:
    """Put fresh adapters on the targeted linear layers, in place; freeze everything else. Returns the names."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    names = target_module_names(model, targets)
    _wrap(model, names, rank, alpha, dropout, rslora, dtype, seed)
    _freeze_base(model)
    return names


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for m in lora_modules(model).values():
        m.enabled = enabled


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes as its base weights alone (the frozen reference of a LoRA run)."""
    mods = lora_modules(model).values()
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


class AdaptersOff:
    """A scoring handle that calls `handle` (the policy's, maybe FSDP- or DDP-wrapped) with `model`'s adapters
    switched off: a LoRA run's frozen reference, computed by the policy's own weights."""

    def __init__(self, handle, model: nn.Module):
        self.handle, self.model = handle, model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.handle(*args, **kwargs)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += s B A, computed in float32) and put plain nn.Linear back."""
    for name, m in lora_modules(model).items():
        if m.enabled:
            m.weight.copy_((m.weight.float() + m.delta_weight().to(m.weight.device)).to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _set_module(model, name, plain)
    return model


# ----------------------------------------------------------------------------------------------- PEFT folder
def _settings(model: nn.Module) -> dict:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    kinds = {(m.rank, m.alpha, m.dropout_p, m.rslora) for m in mods.values()}
    if len(kinds) != 1:
        raise ValueError(f"adapters with different rank / alpha / dropout {sorted(kinds)} cannot be saved as one "
                         "PEFT config (it has one r and one lora_alpha)")
    rank, alpha, dropout, rslora = kinds.pop()
    return dict(names=list(mods), rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)


def adapter_state_dict(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """{PEFT key: tensor on CPU} of the adapters. `state` is the model's full state dict where it was gathered
    elsewhere (FSDP); by default the model's own."""
    state = model.state_dict() if state is None else state
    out = {}
    for name in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            if key not in state:
                raise KeyError(f"state dict has no {key}")
            out[f"{PEFT_PREFIX}{hf_module_name(name)}.{part}.weight"] = state[key].detach().to("cpu").contiguous()
    return out


def peft_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json PEFT reads for the model's adapters."""
    s = _settings(model)
    regex = _peft_target_regex(s["names"])
    hf_names = [hf_module_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    picked = sorted(n for n in hf_names if re.fullmatch(regex, n))
    assert picked == sorted(hf_module_name(n) for n in s["names"]), "target_modules regex selects other layers"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": s["rank"], "lora_alpha": s["alpha"], "lora_dropout": s["dropout"], "use_rslora": s["rslora"],
        "target_modules": regex, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True, "revision": None,
    }
    if model_type in _HF_CLASS:
        cls, lib = _HF_CLASS[model_type]
        cfg["auto_mapping"] = {"base_model_class": cls, "parent_library": lib}
    return cfg


def _atomic(target: Path, write) -> None:
    """Write through a temporary name beside `target`, then rename. The file gets the mode a plain open() gives
    (0666 less the umask): safetensors creates its files 0600."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_adapter(model: nn.Module, path: str | os.PathLike, *, state: dict[str, Tensor] | None = None,
                 base_model_name_or_path: str | None = None, base_fingerprint: dict | None = None) -> Path:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), each file atomically, and
    ``base_fingerprint`` (the base's path and content hash) as ``BASE_FINGERPRINT`` where given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = peft_config(model, base_model_name_or_path)
    tensors = adapter_state_dict(model, state)
    _atomic(path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic(path / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
    if base_fingerprint is not None:
        text = json.dumps(base_fingerprint, indent=2) + "\n"
        _atomic(path / BASE_FINGERPRINT, lambda tmp: Path(tmp).write_text(text))
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    """adapter_config.json, checked for what this module implements (plain or rsLoRA on linear layers)."""
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{f}: peft_type {cfg.get('peft_type')!r}; only LORA adapters load here")
    unsupported = {"use_dora": cfg.get("use_dora"), "fan_in_fan_out": cfg.get("fan_in_fan_out"),
                   "modules_to_save": cfg.get("modules_to_save"), "rank_pattern": cfg.get("rank_pattern"),
                   "alpha_pattern": cfg.get("alpha_pattern"), "lora_bias": cfg.get("lora_bias"),
                   "trainable_token_indices": cfg.get("trainable_token_indices")}
    set_ = {k: v for k, v in unsupported.items() if v}
    if cfg.get("bias", "none") != "none":
        set_["bias"] = cfg["bias"]
    if set_:
        raise ValueError(f"{f}: {set_} are not supported (plain LoRA on linear layers only)")
    for k in ("r", "lora_alpha"):
        if not isinstance(cfg.get(k), (int, float)):
            raise ValueError(f"{f}: {k!r} must be a number, got {cfg.get(k)!r}")
    return cfg


def load_adapter(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> list[str]:
    """Load a PEFT adapter folder onto `model` in place: adapters are added where the folder has them (or reused
    where the model already has them with the same rank) and their weights copied in; the base is frozen."""
    path = Path(path)
    cfg = read_adapter_config(path)
    wfile = path / ADAPTER_WEIGHTS
    if not wfile.is_file():
        raise FileNotFoundError(f"{wfile}: missing (the adapter weights)")
    tensors: dict[str, dict[str, Tensor]] = {}
    with safe_open(wfile, framework="pt", device="cpu") as f:
        for key in f.keys():
            m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", key)
            if m is None:
                raise ValueError(f"{wfile}: tensor {key!r} is not a LoRA weight (base_model.model.<module>."
                                 "lora_A/lora_B.weight)")
            t = f.get_tensor(key)
            check_finite(t, wfile, key)
            tensors.setdefault(canonical_key(m.group(1)), {})[m.group(2)] = t
    linear = {n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    problems = []
    for name, pair in tensors.items():
        if name not in linear:
            problems.append(f"{name}: no such linear layer in the model")
        elif set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{name}: has {sorted(pair)}, needs lora_A and lora_B")
        else:
            mod = model.get_submodule(name)
            want_a, want_b = (rank, mod.in_features), (mod.out_features, rank)
            if tuple(pair["lora_A"].shape) != want_a or tuple(pair["lora_B"].shape) != want_b:
                problems.append(f"{name}: lora_A {tuple(pair['lora_A'].shape)} / lora_B "
                                f"{tuple(pair['lora_B'].shape)}, expected {want_a} / {want_b} (r={rank})")
            elif isinstance(mod, LoRALinear) and (mod.rank, mod.alpha) != (rank, alpha):
                problems.append(f"{name}: the model's adapter has r={mod.rank}, alpha={mod.alpha:g}, the "
                                f"folder's r={rank}, alpha={alpha:g}")
    if not tensors:
        problems.append("no adapter tensors")
    if problems:
        raise ValueError(f"{wfile}: does not fit the model: " + "; ".join(problems))
    fresh = [n for n in tensors if not isinstance(model.get_submodule(n), LoRALinear)]
    order = [n for n, _ in model.named_modules() if n in set(fresh)]
    _wrap(model, order, rank, alpha, float(cfg.get("lora_dropout") or 0.0), bool(cfg.get("use_rslora")), dtype, 0)
    with torch.no_grad():
        for name, pair in tensors.items():
            mod = model.get_submodule(name)
            mod.lora_A.weight.copy_(pair["lora_A"])
            mod.lora_B.weight.copy_(pair["lora_B"])
    _freeze_base(model)
    return sorted(tensors)
