"""torchrun / FSDP2 helpers: who am I, talk to the others, shard the work, wrap the policy, save what is whole.

``torchrun`` starts one process per device; ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) carries the
collectives; FSDP2 ``fully_shard`` (or DDP) wraps the policy in a ``PolicyScorer`` whose forward is teacher-forced
log-probs. Without torchrun every helper degrades to the single-process answer (rank 0 of 1, reductions are the
identity). The choices (prompt-group sharding, one global gradient, mixed precision, gathered sampling, the
reference's placement, whole checkpoints, timeouts) are docs/method.md's "Distributed training".

Shape legend: B prompts per step (global), W ranks, B/W prompts per rank, G samples per prompt.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from emor3.config import MixedPrecision, Parallel, ReferenceMode, choices
from emor3.engine.scoring import completion_logprobs

__all__ = [
    "DistributedError", "init", "shutdown", "is_distributed", "rank", "world_size", "local_rank", "is_main",
    "print0", "barrier", "rank0_first", "all_reduce", "reduce_metrics", "gather_rows", "any_rank", "shard",
    "PolicyScorer", "wrap_policy", "wrap_reference", "run_gathered", "grad_sync", "loss_scale", "grad_norm_value",
    "full_model_state", "full_optimizer_state", "load_optimizer_state", "guard",
]

PARALLEL = choices(Parallel)
REFERENCE = choices(ReferenceMode)
MIXED_PRECISION = choices(MixedPrecision)

_setup_group = None  # gloo group with the long timeout, for rank-0-only setup phases
_timeout_s: float = 0.0


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank crashed, hung, or took longer than the timeout."""


# --------------------------------------------------------------------------------------------- who am I


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (every rank would repeat the same line W times)."""
    if is_main():
        print(*args, **kwargs)


def init(timeout_s: float = 600, setup_timeout_s: float = 7200, device: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment; a no-op (False) when not launched by torchrun
    with WORLD_SIZE > 1 or when already initialised. NCCL when this rank runs on a GPU, gloo otherwise. On GPU the
    rank's device is cuda:LOCAL_RANK."""
    global _setup_group, _timeout_s
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank())
    if use_cuda:
        # NCCL aborts a timed-out collective (instead of hanging) only with async error handling on
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    _timeout_s = float(timeout_s)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=torch.device("cuda", local_rank()) if use_cuda else None)
    _setup_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=max(setup_timeout_s, timeout_s)))
    return True


def shutdown() -> None:
    global _setup_group
    if is_distributed():
        dist.destroy_process_group()
    _setup_group = None


@contextlib.contextmanager
def guard(phase: str):
    """Turn a collective's failure (timeout, peer gone) into a DistributedError that says what happened."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, OSError) as e:
        if not is_distributed() or not _looks_like_comm_error(e):
            raise
        raise DistributedError(
            f"rank {rank()}/{world_size()}: a collective failed during {phase}: another rank crashed, hung or is more "
            f"than --run.dist-timeout={_timeout_s:g}s behind (see its log above; torchrun reports the first failing "
            f"rank). Underlying error: {str(e).strip().splitlines()[0][:300]}"
        ) from e


def _looks_like_comm_error(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return any(w in text for w in ("timed out", "timeout", "connection", "gloo", "nccl", "peer", "broken pipe"))


def barrier(phase: str = "barrier") -> None:
    if is_distributed():
        with guard(phase):
            dist.barrier()


@contextlib.contextmanager
def rank0_first(phase: str = "setup"):
    """Rank 0 runs the block first (it writes shared files: data cache, tiny model, SFT checkpoint, baseline
    evaluation); the other ranks wait on the long setup timeout, then run it and find the files there."""
    if not is_distributed():
        yield
        return
    if not is_main():
        with guard(phase):
            dist.barrier(group=_setup_group)
    yield
    if is_main():
        with guard(phase):
            dist.barrier(group=_setup_group)


# --------------------------------------------------------------------------------------------- reductions


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(value: float | torch.Tensor, op: str = "sum") -> float | torch.Tensor:
    """Reduce a float or tensor over ranks: op "sum", "mean", "min" or "max". The identity on one process."""
    if not is_distributed():
        return value
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"all_reduce: unknown op {op!r}; valid: {sorted(ops)}")
    is_float = not isinstance(value, torch.Tensor)
    t = torch.tensor(float(value), dtype=torch.float64) if is_float else value.detach().clone()
    dev = t.device
    t = t.to(_comm_device())
    with guard(f"all_reduce({op})"):
        dist.all_reduce(t, op=ops[op])
    if op == "mean":
        t = t / world_size()
    return float(t) if is_float else t.to(dev)


def reduce_metrics(metrics: dict[str, float], op: str = "sum") -> dict[str, float]:
    """One collective for a whole dict of scalars (same keys on every rank, in the same order)."""
    if not is_distributed() or not metrics:
        return dict(metrics)
    keys = list(metrics)
    t = all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64), op)
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (a stop signal seen by one rank stops all at the same step)."""
    return bool(all_reduce(float(flag), "max")) if is_distributed() else flag


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0) in rank order: the global tensor of the single-process run, since
    rank r owns the r-th contiguous block of prompts. Every rank must pass the same shape."""
    if not is_distributed():
        return t
    dev, dtype = t.device, t.dtype
    x = t.detach().to(_comm_device())
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    with guard("gather_rows"):
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts).to(device=dev, dtype=dtype)


def shard(items: Sequence, n_ranks: int | None = None, r: int | None = None) -> tuple[int, list]:
    """(offset, items of rank r): contiguous block r of W equal blocks. Equal blocks keep every rank's number of
    micro-batches, hence of FSDP/DDP collectives, the same."""
    W = world_size() if n_ranks is None else n_ranks
    r = rank() if r is None else r
    if len(items) % W:
        raise ValueError(f"{len(items)} prompts per step cannot be split evenly over {W} ranks: make "
                         f"--grpo.prompts-per-step a multiple of the number of processes")
    k = len(items) // W
    return r * k, list(items[r * k : (r + 1) * k])


def loss_scale() -> float:
    """Multiply the backward loss by W: FSDP and DDP average gradients over ranks, the normaliser already divides
    by the global token count, so sum-over-ranks is what the single-process gradient is."""
    return float(world_size())


# --------------------------------------------------------------------------------------------- wrapping


class PolicyScorer(nn.Module):
    """forward = teacher-forced log-probs of completions (``emor3.engine.scoring.completion_logprobs``).

    A module whose ``forward`` does a micro-batch's whole computation (image encoding and log-probs) is what FSDP2
    and DDP hook into; ``model`` stays reachable for sampling, judging and checkpoints."""

    def __init__(self, model: nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast = autocast  # compute dtype over higher-precision parameters (one process, DDP); None: off

    def _amp(self):
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)

    def forward(self, batch, prompt_index, completion_ids, completion_mask, **kw):
        with self._amp():
            out = completion_logprobs(self.model, batch, prompt_index, completion_ids, completion_mask, **kw)
        # FSDP2 hooks the root's outputs for backward and warns about views (an in-place op on one would drop the
        # hook): return copies, (N, T) each, small next to the activations
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) with the whole model gathered (see ``run_gathered``) and under this handle's
        autocast; plain modules: just fn() (under autocast)."""
        if not _fsdp_units(self):
            with self._amp():
                return fn(*args, **kwargs)
        with _all_units_unsharded(self):
            return fn(*args, **kwargs)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units: every decoder layer and vision block (the peers' wrap policy: one unit per transformer
    block)."""
    blocks = list(model.model.layers)
    if hasattr(model, "visual"):
        blocks += list(model.visual.blocks)
    return blocks


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The policy's compute dtype for ``--run.mixed-precision``: auto (bf16 on CUDA, fp32 elsewhere), bf16, fp32."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"unknown --run.mixed-precision {mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")
    if mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def _autocast_dtype(model: nn.Module, mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """autocast's dtype where the compute dtype is narrower than the parameters (fp32 master weights), else None."""
    dtype = compute_dtype(mixed_precision, device)
    wider = any(p.dtype.itemsize > dtype.itemsize for p in model.parameters())
    return dtype if wider else None


def _mp_policy(mixed_precision: str, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype(mixed_precision, device) == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _fully_shard(model: nn.Module, device: torch.device, mixed_precision: str, *, reshard_root: bool,
                 offload: bool = False) -> PolicyScorer:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    kw = dict(mp_policy=_mp_policy(mixed_precision, device),
              offload_policy=CPUOffloadPolicy() if offload and device.type == "cuda" else OffloadPolicy())
    for block in _blocks(model):
        fully_shard(block, **kw)
    scorer = PolicyScorer(model)
    fully_shard(scorer, reshard_after_forward=reshard_root, **kw)
    scorer._emor3_reshard_after_forward = reshard_root  # restored after a gathered rollout
    register_fsdp_forward_method(scorer, "run")
    return scorer


def wrap_policy(model: nn.Module, parallel: str, device: torch.device, mixed_precision: str = "auto") -> nn.Module:
    """The training handle of the policy: a PolicyScorer, FSDP2-sharded or DDP-wrapped when distributed.
    ``model`` itself is sharded in place by FSDP (its parameters become DTensor shards)."""
    if parallel not in PARALLEL:
        raise ValueError(f"unknown --run.parallel {parallel!r}; valid: {', '.join(PARALLEL)}")
    amp = _autocast_dtype(model, mixed_precision, device)
    if not is_distributed():
        return PolicyScorer(model, amp)
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(PolicyScorer(model, amp), device_ids=ids)
    # the root's parameters (embeddings, lm_head) are used again right after forward by backward: keep them whole
    return _fully_shard(model, device, mixed_precision, reshard_root=False)


def wrap_reference(reference: nn.Module, mode: str, parallel: str, device: torch.device,
                   mixed_precision: str = "auto") -> nn.Module:
    """The frozen reference's scoring handle (forward = log-probs, no grad): FSDP2-sharded ("shard"), sharded with
    its shards in CPU memory ("offload"), or a whole copy on each rank ("replicate", and always under DDP)."""
    if mode not in REFERENCE:
        raise ValueError(f"unknown --run.reference {mode!r}; valid: {', '.join(REFERENCE)}")
    if not is_distributed() or parallel == "ddp" or mode == "replicate":
        return PolicyScorer(reference, _autocast_dtype(reference, mixed_precision, device))
    if mode == "offload" and device.type != "cuda":
        print0("[emor3] --run.reference offload: nothing to offload to on a CPU run; sharding it instead")
    return _fully_shard(reference, device, mixed_precision, reshard_root=True, offload=mode == "offload")


def _fsdp_units(handle: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in handle.modules() if isinstance(m, FSDPModule)]


def run_gathered(handles: Sequence[nn.Module | None], fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)`` (a rollout: sampling and RER judging) with every FSDP unit of ``handles``
    unsharded: all-gathered once, full parameters on this rank until fn returns, then resharded. fn then calls the
    plain model's methods (``encode_images``, ``forward`` with a KV cache) and decodes without one all-gather per
    token. The call runs as each handle's root "forward" (``PolicyScorer.run``, registered with
    ``register_fsdp_forward_method``) because FSDP2 initialises and gathers its root only in a root forward.
    Memory: the whole model in the parameter dtype per rank (module docstring). Plain handles: just fn()."""
    handles = [h for h in handles if h is not None]
    if not handles:
        return fn(*args, **kwargs)
    head, rest = handles[0], handles[1:]
    inner = head.module if hasattr(head, "no_sync") else head  # DDP: the PolicyScorer inside
    return inner.run(run_gathered, rest, fn, *args, **kwargs)


@contextlib.contextmanager
def _all_units_unsharded(root: nn.Module):
    units = _fsdp_units(root)
    with guard("unshard for generation"):
        for u in units:
            u.set_reshard_after_forward(False, recurse=False)
            u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            # back to the wrap-time choice: blocks free after forward, a root keeps what backward reuses
            u.set_reshard_after_forward(getattr(u, "_emor3_reshard_after_forward", True), recurse=False)


@contextlib.contextmanager
def grad_sync(handle: nn.Module, enabled: bool):
    """Reduce gradients in this backward only when ``enabled`` (the last micro-batch of a mini-batch): gradient
    accumulation then costs one reduction per optimizer step instead of one per micro-batch."""
    if not is_distributed() or enabled:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(handle, DDP):
        with handle.no_sync():
            yield
        return
    handle.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        handle.set_requires_gradient_sync(True)


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ over FSDP2 (DTensor) parameters returns a DTensor: its full value, a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# --------------------------------------------------------------------------------------------- checkpoints


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU (gathered from the shards: a collective, call on every rank; complete on rank 0).
    Keys are the model's own parameter names, the same at any world size."""
    if not is_distributed():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    with guard("gathering the model state"):
        return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, whole, on CPU (a collective; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with guard("gathering the optimizer state"):
        return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a name-keyed full optimizer state (written at any world size) into this rank's optimizer; every rank
    passes the whole dict (read from the checkpoint file), each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    with guard("loading the optimizer state"):
        set_optimizer_state_dict(model, optimizer, state, options=_options())
