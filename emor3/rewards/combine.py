"""Combine reward components into one scalar per completion, and the plug-in API for user reward functions.

Shapes: B prompts, G samples per prompt, N = B·G completion rows (row n samples prompt n // G).

Components (each (N,) float32, NaN = "cannot score"):
  accuracy     boxed answer equals the label (rules.accuracy_reward; exact, or `normalized_accuracy=True`)
  format       SET format (rules.format_reward; the paper's rule, or `strict_format=True`)
  consistency  RER visual-text self-judgement (emor3.rewards.reflection), passed in by the caller
  coherence    RER emotional self-judgement (emor3.rewards.reflection), passed in by the caller
  <plug-in>    any user function named `module:function`, TRL-style (below)
Weight presets (docs/method.md "Rewards"):
  paper    0.8·acc + 0.1·(cons + coh)/2 + 0.1·format  = weights 0.8 / 0.05 / 0.05 / 0.1   (default, max 1.0)
  release  0.8·acc + 0.1·cons + 0.1·coh + 0.1·format  (the authors' code, max 1.1)
or any weights: a mapping, or a string "accuracy=0.8,format=0.2". A component with weight 0 is still computed and
logged when its inputs are there, it just does not enter the total.

Extras (logged only, never weighted): format_paper, format_strict, accuracy_exact, accuracy_normalized, so a run that
trains on one variant still reports the other beside it.

NaN in the total follows TRL's rule (`(rewards * weights).nansum(dim=1)`): a NaN component drops out of that row's
sum, and the total is NaN only when every weighted component of the row is NaN. None means "this reward does not
apply to this sample" (the usual TRL meaning), which is normally the same for all G rows of a group, so rows within
a group stay comparable. Where TRL then gives such a row 0, we keep NaN, so that `group_advantages` leaves it out of
its group's baseline and gives it advantage 0 instead of a fake low reward.

Plug-ins, TRL-style: `f(prompts, completions, **columns) -> list[float | None]`, called with keywords
`prompts=` (N user-turn texts, each prompt repeated for its G rows), `completions=` (N completion texts) and every
column as a list of N (always `label` and `taxonomy` (the taxonomy name or None), plus whatever the caller passes,
e.g. `id`). Functions should accept `**kwargs` for columns they do not use, as in TRL. Spec on the command line:
`package.module:function` or `package.module:function=WEIGHT` (weight 1.0 when omitted); the component is named after
the function. None → NaN, handled as described above.

A plug-in that scores no row of a batch (every value None or NaN) is almost always broken (a renamed column, an
exception swallowed inside it), and it would silently drop out of every total. `on_all_nan` says what
then happens: "warn" (default) warns once per plug-in and process, naming it; "error" raises. Either way the count
of unscorable rows of every component is in `RewardBreakdown.metrics()` as `reward/<name>_nan_rows`.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from emor3.config import PluginAllNaN, WeightPreset, choices
from emor3.rewards.rules import accuracy_reward, format_reward

WEIGHT_PRESETS: dict[str, dict[str, float]] = {
    "paper": {"accuracy": 0.8, "consistency": 0.05, "coherence": 0.05, "format": 0.1},
    "release": {"accuracy": 0.8, "consistency": 0.1, "coherence": 0.1, "format": 0.1},
}
assert tuple(WEIGHT_PRESETS) == choices(WeightPreset), "WeightPreset (emor3.config) names every preset"
BUILTIN_COMPONENTS = ("accuracy", "format", "consistency", "coherence")
REFLECTION_COMPONENTS = ("consistency", "coherence")
ALL_NAN_POLICIES = choices(PluginAllNaN)
_warned_all_nan: set[str] = set()  # plug-ins already warned about in this process


@dataclass
class RewardBreakdown:
    """Rewards of one rollout batch: the weighted total and every component, per completion."""

    total: torch.Tensor  # (N,) float32, NaN = unscorable row (advantage 0, left out of the group baseline)
    components: dict[str, torch.Tensor]  # name -> (N,) float32, NaN = unscorable; every component, weighted or not
    weights: dict[str, float]  # name -> weight used for the total (components missing here have weight 0)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N,) float32, logged only

    def __post_init__(self) -> None:
        assert self.total.dim() == 1 and self.total.dtype == torch.float32, "total must be (N,) float32"
        n = self.total.shape[0]
        for name, t in {**self.components, **self.extras}.items():
            assert t.shape == (n,), f"reward component {name!r} has shape {tuple(t.shape)}, expected ({n},)"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.components)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Means over scorable rows (NaN-aware) of the total, every component and extra; the count of unscorable
        rows of the total (`unscorable`) and of every component (`<name>_nan_rows`)."""
        out = {f"{prefix}total": _nanmean(self.total), f"{prefix}unscorable": float(torch.isnan(self.total).sum())}
        for name, t in {**self.components, **self.extras}.items():
            out[f"{prefix}{name}"] = _nanmean(t)
        for name, t in self.components.items():
            out[f"{prefix}{name}_nan_rows"] = float(torch.isnan(t).sum())
        return out


def _nanmean(t: torch.Tensor) -> float:
    ok = ~torch.isnan(t)
    return float(t[ok].mean()) if bool(ok.any()) else float("nan")


# ----------------------------------------------------------------------------------------------------------- weights


def resolve_weights(spec: str | Mapping[str, float]) -> dict[str, float]:
    """Weights from a preset name ("paper", "release"), a string "name=w,name=w", or a mapping."""
    if isinstance(spec, str):
        if spec in WEIGHT_PRESETS:
            return dict(WEIGHT_PRESETS[spec])
        if "=" not in spec:
            raise ValueError(f"unknown reward weight preset {spec!r}; valid: {sorted(WEIGHT_PRESETS)} or 'name=w,...'")
        out: dict[str, float] = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"reward weights {spec!r}: cannot read {part!r} as name=number") from None
        spec = out
    weights = {str(k): float(v) for k, v in dict(spec).items()}
    for k, v in weights.items():
        if not math.isfinite(v):
            raise ValueError(f"reward weight {k!r} = {v} is not finite")
    return weights


# ----------------------------------------------------------------------------------------------------------- plug-ins


@dataclass(frozen=True)
class RewardPlugin:
    """A user reward function, TRL-style: `fn(prompts=..., completions=..., **columns) -> list[float | None]`."""

    name: str
    fn: Callable[..., Sequence[Any]]
    weight: float = 1.0
    spec: str = ""


def load_reward_plugin(spec: str, weight: float | None = None) -> RewardPlugin:
    """Import `package.module:function[=weight]`. An explicit `weight` argument overrides the one in the spec."""
    target, _, w = spec.partition("=")
    module_name, colon, func_name = target.strip().partition(":")
    if not colon or not module_name or not func_name:
        raise ValueError(f"reward plug-in {spec!r}: expected 'package.module:function' or "
                         f"'package.module:function=WEIGHT'")
    if w:
        try:
            spec_weight = float(w)
        except ValueError:
            raise ValueError(f"reward plug-in {spec!r}: weight {w!r} is not a number") from None
    else:
        spec_weight = 1.0
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"reward plug-in {spec!r}: cannot import module {module_name!r} ({e}); is it on "
                          f"PYTHONPATH?") from e
    fn = module
    for attr in func_name.split("."):
        if not hasattr(fn, attr):
            raise AttributeError(f"reward plug-in {spec!r}: {module_name!r} has no attribute {func_name!r}")
        fn = getattr(fn, attr)
    if not callable(fn):
        raise TypeError(f"reward plug-in {spec!r}: {func_name!r} is a {type(fn).__name__}, not a function")
    name = func_name.split(".")[-1]
    if name in BUILTIN_COMPONENTS:
        raise ValueError(f"reward plug-in {spec!r}: name {name!r} clashes with a built-in reward {BUILTIN_COMPONENTS}")
    weight = spec_weight if weight is None else float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"reward plug-in {spec!r}: weight {weight} is not finite")
    return RewardPlugin(name=name, fn=fn, weight=weight, spec=spec)


def _call_plugin(p: RewardPlugin, prompts: list, completions: list[str], columns: dict[str, list]) -> torch.Tensor:
    values = p.fn(prompts=prompts, completions=completions, **columns)
    n = len(completions)
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"reward plug-in {p.spec or p.name!r} returned {type(values).__name__}, expected a list of "
                        f"{n} floats or None") from None
    if len(values) != n:
        raise ValueError(f"reward plug-in {p.spec or p.name!r} returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))  # cannot score: NaN (module docstring: NaN in the total)
            continue
        if isinstance(v, (bool, int, float)) or (hasattr(v, "__float__") and not isinstance(v, str)):
            f = float(v)
            if math.isinf(f):
                raise ValueError(f"reward plug-in {p.spec or p.name!r}: value {f} at row {i} is infinite")
            out.append(f)
        else:
            raise TypeError(f"reward plug-in {p.spec or p.name!r}: value at row {i} is {type(v).__name__} {v!r}, "
                            f"expected a float or None")
    return torch.tensor(out, dtype=torch.float32)  # (N,)


def _report_all_nan(p: RewardPlugin, n: int, on_all_nan: str) -> None:
    msg = (f"reward plug-in {p.spec or p.name!r} returned None/NaN for all {n} completions, so it adds nothing to "
           f"any reward; check that it reads the columns it is given (label, taxonomy, ...) and returns floats")
    if on_all_nan == "error":
        raise ValueError(msg)
    if p.name not in _warned_all_nan:
        _warned_all_nan.add(p.name)
        warnings.warn(msg + " (warned once; the count is logged as "
                      f"reward/{p.name}_nan_rows)", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------------------ combine


def _per_row(x: Any, n: int, what: str) -> list:
    """One entry per row: a sequence of length n as is, anything else repeated."""
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{what}: got {len(x)} entries for {n} completions")
        return list(x)
    return [x] * n


def combine(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """total (N,) = Σ_k weights[k]·components[k] over weights that are non-zero, NaN components left out; NaN where
    every weighted component is NaN."""
    used = [k for k, w in weights.items() if w != 0.0]
    missing = [k for k in used if k not in components]
    if missing:
        raise ValueError(f"reward weights name {missing} but no such component was computed; have "
                         f"{sorted(components)}")
    n = next(iter(components.values())).shape[0] if components else 0
    if not used:
        return torch.zeros(n, dtype=torch.float32)  # (N,)
    vals = torch.stack([components[k].float() for k in used], dim=1)  # (N, K)
    w = torch.tensor([float(weights[k]) for k in used], dtype=torch.float32)  # (K,)
    nan = torch.isnan(vals)  # (N, K)
    total = torch.where(nan, torch.zeros_like(vals), vals * w).sum(dim=1)  # (N,)
    unscorable = nan.all(dim=1)  # (N,)
    return torch.where(unscorable, torch.full_like(total, float("nan")), total)  # (N,)


def compute_rewards(
    completions: Sequence[str],
    labels: Sequence[str],
    *,
    taxonomies: Any = None,
    weights: str | Mapping[str, float] = "paper",
    reflection: Mapping[str, torch.Tensor] | None = None,
    plugins: Sequence[RewardPlugin] = (),
    prompts: Sequence[Any] | None = None,
    columns: Mapping[str, Sequence[Any]] | None = None,
    strict_format: bool = False,
    normalized_accuracy: bool = False,
    on_all_nan: str = "warn",
) -> RewardBreakdown:
    """Score N completions and combine them into a `RewardBreakdown`.

    labels: N canonical labels (row n's sample label). taxonomies: one taxonomy for all rows or N of them (or None).
    reflection: {"consistency": (N,), "coherence": (N,)} from `emor3.rewards.reflection.reflect`, required when a
    reflection component has a non-zero weight. plugins: from `load_reward_plugin`; their weights join `weights`.
    prompts / columns: what plug-ins receive (prompts default to N empty strings).
    on_all_nan: "warn" (once per plug-in) or "error" when a plug-in scores none of the N rows (module docstring).
    """
    if on_all_nan not in ALL_NAN_POLICIES:
        raise ValueError(f"unknown on_all_nan {on_all_nan!r}; valid: {ALL_NAN_POLICIES}")
    completions = list(completions)
    n = len(completions)
    labels = _per_row(list(labels), n, "labels")
    taxes = _per_row(taxonomies, n, "taxonomies")
    w = resolve_weights(weights)
    for p in plugins:
        if p.name in w:
            raise ValueError(f"reward plug-in {p.spec or p.name!r}: a weight for {p.name!r} is already set")
        w[p.name] = p.weight
    unknown = [k for k in w if k not in BUILTIN_COMPONENTS and k not in {p.name for p in plugins}]
    if unknown:
        raise ValueError(f"unknown reward components {unknown}; valid: {BUILTIN_COMPONENTS} or a loaded plug-in")

    def rule(f, *args, **kw) -> torch.Tensor:
        return torch.tensor([f(*a, **kw) for a in zip(*args)], dtype=torch.float32)  # (N,)

    extras = {
        "format_paper": rule(format_reward, completions),
        "format_strict": rule(format_reward, completions, strict=True),
        "accuracy_exact": rule(accuracy_reward, completions, labels, taxes),
        "accuracy_normalized": rule(accuracy_reward, completions, labels, taxes, normalized=True),
    }
    comps = {
        "accuracy": extras["accuracy_normalized" if normalized_accuracy else "accuracy_exact"],
        "format": extras["format_strict" if strict_format else "format_paper"],
    }
    for k in REFLECTION_COMPONENTS:
        if reflection is not None and k in reflection:
            t = torch.as_tensor(reflection[k], dtype=torch.float32).reshape(-1)  # (N,)
            if t.shape[0] != n:
                raise ValueError(f"reflection[{k!r}] has {t.shape[0]} rows for {n} completions")
            comps[k] = t
        elif w.get(k, 0.0) != 0.0:
            raise ValueError(f"reward weight {k!r} = {w[k]} but no reflection scores were passed; run "
                             f"emor3.rewards.reflection.reflect or set its weight to 0")
    if plugins:
        prompt_list = _per_row(list(prompts) if prompts is not None else "", n, "prompts")
        cols = {"label": labels, "taxonomy": [getattr(t, "name", t) for t in taxes]}
        for k, v in (columns or {}).items():
            cols[k] = _per_row(list(v), n, f"column {k!r}")
        for p in plugins:
            comps[p.name] = _call_plugin(p, prompt_list, completions, cols)
            if n and bool(torch.isnan(comps[p.name]).all()):
                _report_all_nan(p, n, on_all_nan)
    total = combine(comps, w)
    return RewardBreakdown(total=total, components=comps, weights=w, extras=extras)
