"""Per-GPU memory of a GRPO run, planned from the model config and the run settings before anything is loaded.

``estimate(model_cfg, plan)`` returns the bytes one process holds, component by component:

  parameters      the trained copy (``--model.dtype``, fp32 for training): whole, or 1/W under FSDP
  gradients       one per trained parameter, in the parameter dtype (1/W under FSDP; DDP adds its buckets)
  optimizer       AdamW's two moments in the parameter dtype (1/W under FSDP)
  reference       the frozen KL reference in the compute dtype (sharded 1/W, offloaded 0, or whole)
  rollout copy    the weights sampling reads in the compute dtype: FSDP gathers the whole model for a rollout;
                  a single process under autocast caches a bf16 cast of every trained weight while it samples
  KV cache        one sampling chunk: chunk x G rows x (prompt + new tokens) slots, plus the chunk's B-row prefill
                  cache that exists while it is copied to the G rows
  activations     what backward keeps for one micro-batch of teacher forcing (text layers over rows x length,
                  vision blocks over the micro-batch's image patches, the log-prob head's chunk), with and
                  without gradient checkpointing
  compute copy    under mixed precision, the bf16 weights a forward/backward reads (autocast's cast cache on one
                  process; under FSDP the root's embeddings and head, kept unsharded, and two gathered units)

and two totals: the rollout phase (parameters, optimizer, reference, rollout copy, KV cache, sampling workspace;
gradients are freed after every optimizer step) and the update phase (parameters, gradients, optimizer,
reference, compute copy, activations of one micro-batch). The peak is the larger.

Activation bytes per token and layer are linear in the widths, with coefficients measured once from the tensors
autograd saves in this package's decoder layer and vision block (saved-tensor hooks), per compute mode:
  text layer, bytes per token:   a_D·D + a_K·(K·hd) + a_I·I + 4·H + rb·D (the layer's input, kept by the next)
  vision block, bytes per patch: b_C·C + b_I·I_v + 4·H_v + rb·C
where rb is the residual stream's dtype size (fp32 under autocast, where norms and residual adds stay fp32).
With gradient checkpointing each layer keeps only its input, and backward recomputes one layer at a time.
``tests/test_memory.py`` checks the totals against the live tensor bytes measured on the tiny model (CPU).

Shape legend: W processes, B prompts, G samples per prompt, N = B·G rows, P prompt tokens, T new tokens,
L = P + T, D text width, I MLP width, K kv heads, hd head dim, V vocabulary, C vision width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from emor3.config import Config, Dtype, choices
from emor3.data.loaders import holds_clips
from emor3.models.checkpoint import build_model
from emor3.models.config import QwenVLConfig
from emor3.models.lora import add_lora

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
assert set(DTYPE_BYTES) == set(choices(Dtype)), "a byte size for every dtype --model.dtype accepts"

# Saved bytes per token (text) / per patch (vision) and layer: (width coef, kv/I coef, MLP coef), per compute mode.
# "fp32": fp32 weights and compute; "autocast": fp32 weights under bf16 autocast; "bf16": bf16 weights (FSDP's
# mixed precision casts the unit's parameters, so its compute is pure bf16).
_TEXT_COEF = {"fp32": (28, 8, 16), "autocast": (26, 4, 8), "bf16": (20, 4, 8)}
_VISION_COEF = {"fp32": (40, 16), "autocast": (28, 8), "bf16": (30, 8)}


@dataclass(frozen=True)
class RunPlan:
    """The run settings that decide memory (``plan_from_config`` reads them from a ``Config``)."""

    prompts_per_rank: int  # prompts this process samples and trains on per step
    group_size: int  # G
    prompt_tokens: int  # longest prompt in tokens, image tokens included
    image_patches: int  # vision patches of one prompt's image(s), before the 2x2 merge
    max_new_tokens: int  # T
    micro_batch_rows: int  # rows per forward/backward
    world_size: int = 1  # W
    parallel: str = "fsdp"  # fsdp | ddp (world 1: neither)
    param_dtype: str = "float32"  # trained parameters, gradients, AdamW moments
    compute_dtype: str = "bfloat16"  # forward, backward and sampling
    freeze_vision: bool = False
    reference: str | None = "shard"  # shard | offload | replicate | None (no reference model)
    sample_chunk: int = 0  # prompts sampled together; 0: all of the rank's prompts
    gradient_checkpointing: bool = True
    logprob_chunk: int = 128  # tokens per log-softmax block of the chunked log-probs
    shared_prefix: bool = False  # teacher forcing runs each prompt once for its G rows (--grpo.shared-prefix)
    lora_rank: int = 0  # > 0: only LoRA adapters train (fp32), the base is frozen and the reference is the base
    lora_targets: tuple[str, ...] = ()
    init_reference: bool = False  # --grpo.reference init: the reference is its own frozen model, also with LoRA
    clip_frames: int = 0  # > 0: the prompts hold clips of this many frames (image_patches are the clip's patches)


@dataclass
class MemoryEstimate:
    """Bytes per process: ``rows`` name -> bytes, phase totals, and the table that --dry-run prints."""

    rows: dict[str, int]
    rollout_peak: int
    update_peak: int
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.rollout_peak, self.update_peak)

    def table(self, title: str = "") -> str:
        lines = ([f"{title}"] if title else []) + ["| component | GiB per process | what |", "|---|---|---|"]
        for k, v in self.rows.items():
            lines.append(f"| {k} | {v / GiB:.2f} | {self.notes.get(k, '')} |")
        lines.append(f"| **rollout phase** | **{self.rollout_peak / GiB:.2f}** | |")
        lines.append(f"| **update phase** | **{self.update_peak / GiB:.2f}** | |")
        return "\n".join(lines)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    vision: int  # visual.* (patch embed, blocks, merger)
    layers: int  # the decoder layers
    embed: int  # the token embedding
    head: int  # the untied lm_head (0 when tied to the embedding)
    root: int  # parameters outside decoder layers and vision blocks (embeddings, head, norms, patch embed, merger)
    largest_unit: int  # the largest decoder layer or vision block (an FSDP unit)


def param_counts(cfg: QwenVLConfig) -> ParamCounts:
    """Exact parameter counts, from the model built on the meta device (no memory, no arithmetic to drift)."""
    with torch.device("meta"):
        m = build_model(cfg)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    total = count(m)
    units = [count(u) for u in [*m.model.layers, *m.visual.blocks]]
    head = 0 if cfg.tie_word_embeddings else count(m.lm_head)
    return ParamCounts(total, count(m.visual), count(m.model.layers), m.model.embed_tokens.weight.numel(), head,
                       total - sum(units), max(units))


def lora_param_count(cfg, rank: int, targets) -> int:
    """Adapter parameters of ``--model.lora-rank`` / ``--model.lora-targets`` (adapters put on the meta model)."""
    with torch.device("meta"):
        m = build_model(cfg)
    add_lora(m, rank=rank, alpha=float(rank), targets=list(targets))
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def compute_mode(param_dtype: str, compute_dtype: str, fsdp: bool) -> str:
    if compute_dtype == "float32":
        return "fp32"
    return "bf16" if fsdp or param_dtype == compute_dtype else "autocast"


def activation_bytes(cfg: QwenVLConfig, *, rows: int, length: int, targets: int, patches: int, mode: str,
                     checkpointing: bool, logprob_chunk: int = 128, tokens: int | None = None) -> dict[str, int]:
    """Bytes autograd holds after one micro-batch's forward (rows x length tokens, of which the last ``targets``
    are scored, and ``patches`` vision patches), with or without checkpointing, by part: "text" (decoder layers,
    embeddings, final norm and scored hidden states), "vision" (blocks, merger, pixels), and "workspace" (what
    backward adds while it runs: one layer recomputed and its gradients, one (chunk, V) logits block)."""
    t, v = cfg.text, cfg.vision
    cb = 4 if mode == "fp32" else 2  # matmul outputs
    rb = 2 if mode == "bf16" else 4  # residual stream and norms
    aD, aK, aI = _TEXT_COEF[mode]
    per_tok = aD * t.hidden_size + aK * t.num_key_value_heads * t.head_dim + aI * t.intermediate_size \
        + 4 * t.num_attention_heads + rb * t.hidden_size
    bC, bI = _VISION_COEF[mode]
    per_patch = bC * v.hidden_size + bI * v.intermediate_size + 4 * v.num_heads + rb * v.hidden_size
    tokens = rows * length if tokens is None else tokens  # shared prefix: prompts once plus the rows' completions
    text_layer, vis_block = per_tok * tokens, per_patch * patches
    if checkpointing:  # each layer keeps only its input
        text = t.num_hidden_layers * rb * t.hidden_size * tokens
        vis = v.depth * rb * v.hidden_size * patches
    else:
        text = t.num_hidden_layers * text_layer
        vis = v.depth * vis_block
    m2 = v.spatial_merge_size ** 2
    vis += patches * (2 * rb * v.hidden_size + 3 * cb * v.hidden_size) + patches // m2 * cb * t.hidden_size \
        + patches * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * (4 + (cb if cb < 4 else 0))
    # final norm (input and output) and the scored hidden states the log-prob head keeps
    text += tokens * 2 * rb * t.hidden_size + rows * targets * cb * t.hidden_size
    # backward's own tensors: with checkpointing the recomputed layer and the gradients flowing through it (about
    # 1.25 layers' saved tensors, measured), without it gradients of activations being freed as it goes (about
    # half a layer); one (chunk, V) fp32 logits block, its softmax and gradient
    workspace = int((1.25 if checkpointing else 0.5) * text_layer) \
        + 3 * min(logprob_chunk, rows * targets) * t.vocab_size * 4
    return {"text": int(text), "vision": int(vis), "workspace": int(workspace)}


def estimate(cfg: QwenVLConfig, plan: RunPlan) -> MemoryEstimate:
    """Bytes per process of every component and phase for ``plan`` (see the module docstring)."""
    W = plan.world_size
    fsdp = W > 1 and plan.parallel == "fsdp"
    ddp = W > 1 and plan.parallel == "ddp"
    pb, cb = DTYPE_BYTES[plan.param_dtype], DTYPE_BYTES[plan.compute_dtype]
    mixed = plan.param_dtype != plan.compute_dtype
    mode = compute_mode(plan.param_dtype, plan.compute_dtype, fsdp)
    n = param_counts(cfg)
    trained = n.total - (n.vision if plan.freeze_vision else 0)
    lora = lora_param_count(cfg, plan.lora_rank, plan.lora_targets) if plan.lora_rank else 0
    gb = pb  # bytes of a trained parameter, its gradient and each AdamW moment
    if lora:  # adapters are fp32 whatever the base dtype; the base is frozen
        trained, gb = lora, 4
    shard = W if fsdp else 1
    t = cfg.text
    rows: dict[str, int] = {}
    notes: dict[str, str] = {}

    rows["parameters"] = (n.total * pb + lora * 4) // shard
    notes["parameters"] = f"{n.total / 1e9:.2f}B x {pb} B" + (f" + {lora / 1e6:.1f}M LoRA x 4 B" if lora else "") + \
        (f" / {W}" if fsdp else "")
    rows["gradients"] = trained * gb // shard * (2 if ddp else 1)
    notes["gradients"] = f"{trained / 1e9:.3f}B trained x {gb} B" + (f" / {W}" if fsdp else "") + \
        (" x 2 (DDP buckets)" if ddp else "")
    rows["optimizer"] = 2 * trained * gb // shard
    notes["optimizer"] = f"AdamW: 2 moments x {gb} B" + (f" / {W}" if fsdp else "")
    if lora and not (plan.init_reference and plan.reference is not None):
        rows["reference"] = 0
        notes["reference"] = "none: LoRA's reference is the base with its adapters off"
    elif plan.reference is None:
        rows["reference"] = 0
        notes["reference"] = "none (beta = 0, policy judges)"
    else:
        ref_shard = {"shard": shard, "offload": 0, "replicate": 1}[plan.reference if fsdp else "replicate"]
        rb_ = min(pb, cb)  # held in the compute dtype where that is narrower
        rows["reference"] = 0 if ref_shard == 0 else n.total * rb_ // ref_shard
        notes["reference"] = f"{plan.reference if fsdp else 'whole'}, {rb_} B per parameter"
    if fsdp:
        rows["rollout copy"] = n.total * min(pb, cb)
        notes["rollout copy"] = f"whole model gathered for sampling, {min(pb, cb)} B per parameter"
    elif mixed:
        rows["rollout copy"] = trained * cb
        notes["rollout copy"] = f"autocast's {cb}-byte cast of the trained weights while sampling"
    else:
        rows["rollout copy"] = 0
        notes["rollout copy"] = "sampling reads the trained weights"

    chunk = plan.sample_chunk or plan.prompts_per_rank
    G = plan.group_size
    slots = plan.prompt_tokens + plan.max_new_tokens
    per_row = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * slots * cb  # k and v
    rows["KV cache"] = per_row * chunk * (G + (1 if G > 1 else 0))
    notes["KV cache"] = f"{chunk} prompts x G {G} rows x {slots} slots (+ the {chunk}-row prefill cache)"
    # sampling workspace: the prefill's attention mask and one layer's temporaries over the chunk's prompts, the
    # image encoder's over its patches, and the decode step's (N, V) fp32 logits, softmax and cumulative sum
    v = cfg.vision
    prefill = chunk * plan.prompt_tokens * (slots * (1 + cb) + cb * (4 * t.hidden_size + 3 * t.intermediate_size))
    encode = chunk * plan.image_patches * cb * (4 * v.hidden_size + 3 * v.intermediate_size)
    decode = 3 * chunk * G * t.vocab_size * 4
    sampling_ws = max(prefill, encode, decode)

    mb_rows = min(plan.micro_batch_rows, plan.prompts_per_rank * G)
    mb_prompts = max(1, mb_rows // G)
    tokens = mb_prompts * plan.prompt_tokens + mb_rows * plan.max_new_tokens if plan.shared_prefix else None
    acts = {ck: activation_bytes(cfg, rows=mb_rows, length=slots, targets=plan.max_new_tokens,
                                 patches=mb_prompts * plan.image_patches, mode=mode, checkpointing=ck,
                                 logprob_chunk=plan.logprob_chunk, tokens=tokens) for ck in (True, False)}
    rows["activations (checkpointing)"] = sum(acts[True].values())
    rows["activations (no checkpointing)"] = sum(acts[False].values())
    notes["activations (checkpointing)"] = f"one micro-batch: {mb_rows} rows x {slots} tokens, " \
        f"{mb_prompts * plan.image_patches} patches"
    notes["activations (no checkpointing)"] = "the same micro-batch, every layer's saved tensors"
    if fsdp:
        compute_copy = (n.root + 2 * n.largest_unit) * cb + 2 * n.largest_unit * 4  # + reduce-scatter buffers
        notes["compute copy"] = "unsharded root (embeddings, head) and two gathered units"
    elif mixed:
        compute_copy = trained * cb
        notes["compute copy"] = f"autocast's {cb}-byte cast of the trained weights"
    else:
        compute_copy = 0
        notes["compute copy"] = "none (the parameters are the compute dtype)"
    rows["compute copy"] = compute_copy

    # Backward runs head -> decoder layers (top first) -> embedding -> vision; each part's gradients appear as its
    # activations are freed, so the peak is at one of three moments: backward starting (head gradients and every
    # activation), the text side done (its gradients, the vision activations), or the end (every gradient).
    a = acts[plan.gradient_checkpointing]
    g = rows["gradients"] / max(1, trained)  # bytes per trained parameter
    g_head = 0 if lora else (n.head or n.embed) * g
    g_text = 0 if lora else (n.layers + (n.embed if n.head else 0)) * g
    persistent = rows["parameters"] + rows["optimizer"] + rows["reference"]
    rollout = persistent + rows["rollout copy"] + rows["KV cache"] + sampling_ws
    update = persistent + compute_copy + max(g_head + a["text"] + a["vision"] + a["workspace"],
                                             g_head + g_text + a["vision"] + a["workspace"],
                                             rows["gradients"])
    return MemoryEstimate(rows, int(rollout), int(update), notes)


def largest_sample_chunk(cfg: QwenVLConfig, plan: RunPlan, budget_bytes: int) -> int:
    """The largest chunk of prompts (a divisor of the rank's prompts, so every chunk has the same size) whose
    rollout phase, everything this process holds while sampling included, fits in ``budget_bytes``; 1 if none
    does. On CUDA the budget is the free memory plus what this process already holds."""
    best = 1
    for k in range(1, plan.prompts_per_rank + 1):
        if plan.prompts_per_rank % k == 0 and \
                estimate(cfg, dataclasses.replace(plan, sample_chunk=k)).rollout_peak <= budget_bytes:
            best = k
    return best


# the SET prompt's text around the image: system turn, question with the label list, instruction (about 170 Qwen
# tokens for Mikels' eight); a plan assumes this much text besides the image tokens
PROMPT_TEXT_TOKENS = 256
QWEN3_TIMESTAMP_TOKENS = 8  # Qwen3-VL's "<t.t seconds><|vision_start|>...<|vision_end|>" around each temporal patch


def trains_on_clips(cfg: Config) -> bool | None:
    """Whether a run's prompts hold clips: the EmoScenes clip variant, or a training set of clips
    (`emor3.data.loaders.holds_clips`); None when --data.train does not exist here (the plan then assumes images)."""
    if not cfg.data.train:
        return cfg.data.emoscenes_variant == "clips"
    return holds_clips(cfg.data.train)


def plan_from_config(cfg: Config, model_cfg, world_size: int) -> RunPlan:
    """The RunPlan of a run's Config on ``world_size`` processes: the longest prompt is the largest image the pixel
    budget allows plus the SET text, capped at --data.max-prompt-length (longer prompts are dropped). A run on clips
    (`trains_on_clips`) plans for the largest clip instead: --model.video-max-frames frames (rounded up to whole
    temporal patches) at --model.video-max-pixels each, plus Qwen3-VL's timestamp text per temporal patch."""
    g, m, v = cfg.grpo, cfg.model, model_cfg.vision
    patches = image_patches_for(m.max_pixels, v.patch_size, v.spatial_merge_size)
    merge2 = v.spatial_merge_size ** 2
    text = PROMPT_TEXT_TOKENS
    frames = m.video_max_frames if trains_on_clips(cfg) else 0
    if frames:
        t = -(-frames // v.temporal_patch_size)  # temporal patches
        patches = t * image_patches_for(m.video_max_pixels or m.max_pixels, v.patch_size, v.spatial_merge_size)
        if getattr(model_cfg, "model_type", "") == "qwen3_vl":
            text += QWEN3_TIMESTAMP_TOKENS * t
    prompt = patches // merge2 + text
    if cfg.data.max_prompt_length:
        prompt = min(prompt, cfg.data.max_prompt_length)
        patches = min(patches, max(0, cfg.data.max_prompt_length - text) * merge2)
    needs_ref = cfg.needs_reference()
    device = "cuda" if (m.device.startswith("cuda") or (m.device == "auto" and torch.cuda.is_available())) else "cpu"
    compute = {"bf16": "bfloat16", "fp32": "float32"}.get(cfg.run.mixed_precision) or \
        ("bfloat16" if device == "cuda" else "float32")
    return RunPlan(prompts_per_rank=g.prompts_per_step // world_size, group_size=g.group_size, prompt_tokens=prompt,
                   image_patches=patches, max_new_tokens=g.max_new_tokens, micro_batch_rows=g.micro_batch_rows,
                   world_size=world_size, parallel=cfg.run.parallel, param_dtype=m.dtype, compute_dtype=compute,
                   freeze_vision=m.freeze_vision, reference=cfg.run.reference if needs_ref else None,
                   sample_chunk=g.sample_chunk, gradient_checkpointing=m.gradient_checkpointing,
                   shared_prefix=g.shared_prefix, lora_rank=m.lora_rank, lora_targets=tuple(m.lora_targets),
                   init_reference=g.reference == "init", clip_frames=frames)


def run_table(cfg: Config, model_cfg, world_size: int) -> str:
    """The memory plan of a run on ``world_size`` processes as the Markdown table --dry-run and every run print."""
    plan = plan_from_config(cfg, model_cfg, world_size)
    est = estimate(model_cfg, plan)
    chunk = plan.sample_chunk or plan.prompts_per_rank
    title = (f"Memory plan per process ({world_size} process{'es' if world_size > 1 else ''}, "
             f"{'FSDP2' if world_size > 1 and plan.parallel == 'fsdp' else 'DDP' if world_size > 1 else 'one device'}"
             f", {plan.param_dtype} parameters, {plan.compute_dtype} compute, gradient checkpointing "
             f"{'on' if plan.gradient_checkpointing else 'off'}; {plan.prompts_per_rank} prompts x G "
             f"{plan.group_size} per process sampled {chunk} at a time, prompts up to {plan.prompt_tokens} tokens"
             f"{f' (clips of {plan.clip_frames} frames)' if plan.clip_frames else ''}, {plan.max_new_tokens} new):")
    lines = [est.table(title), f"peak: {est.peak / GiB:.1f} GiB per process"]
    if plan.sample_chunk == 0:  # what --grpo.sample-chunk 0 picks on a GPU (90 % of its memory usable)
        picks = []
        for gpu_gib in (80, 141):
            k = largest_sample_chunk(model_cfg, plan, int(0.9 * gpu_gib * GiB))
            e = estimate(model_cfg, dataclasses.replace(plan, sample_chunk=k))
            picks.append(f"{gpu_gib} GB GPU: {k} prompts at a time (peak {e.peak / GiB:.1f} GiB)")
        lines.append("--grpo.sample-chunk 0 on CUDA samples the largest chunk that fits: " + "; ".join(picks))
    return "\n".join(lines)


def device_memory(cfg: Config) -> tuple[int | None, str]:
    """(bytes, what) of the memory a run's device offers each process: the GPU's total memory on CUDA, the
    machine's physical memory on CPU; None where the planned device is not here (a CUDA plan made on a CPU)."""
    d = cfg.model.device
    cuda = d.startswith("cuda") or (d == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            return None, "a CUDA device (none is visible here)"
        index = int(d.split(":", 1)[1]) if ":" in d else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"the GPU {props.name} (cuda:{index})"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, "the host's memory (unknown)"
    return total, "the host's memory (the plan is for the CPU)"


def fits_verdict(cfg: Config, model_cfg, world_size: int) -> tuple[bool | None, str]:
    """Whether the plan's peak fits the memory of the device it plans for (``device_memory``), in one plain
    sentence: (True / False / None where that memory is unknown, the sentence)."""
    peak = estimate(model_cfg, plan_from_config(cfg, model_cfg, world_size)).peak
    total, what = device_memory(cfg)
    if total is None:
        return None, (f"fits: unknown; the planned peak is {peak / GiB:.1f} GiB per process, and {what} has no "
                      "memory to compare with")
    if peak <= total:
        return True, (f"fits: yes; the planned peak {peak / GiB:.1f} GiB per process is within the "
                      f"{total / GiB:.1f} GiB of {what}")
    return False, (f"fits: NO; the planned peak {peak / GiB:.3g} GiB per process exceeds the {total / GiB:.1f} GiB "
                   f"of {what}: lower --grpo.sample-chunk, --grpo.micro-batch-rows, --model.max-pixels or "
                   "--grpo.max-new-tokens, or add processes")


def image_patches_for(max_pixels: int, patch_size: int = 14, merge: int = 2) -> int:
    """Patches of the largest image the processor makes under ``max_pixels`` (sides multiples of patch x merge)."""
    f = patch_size * merge
    side = f * max(1, math.isqrt(max_pixels // (f * f)))
    return (side // patch_size) ** 2


# --------------------------------------------------------------------------------------------- measuring


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside this mode and still alive: ``now`` and ``peak``.

    Every operator output's storage is counted once and uncounted when it is freed (a weakref finalizer); views
    and in-place results share an input's storage and are not counted. This is how the CPU tests measure memory,
    where torch keeps no allocator statistics; on CUDA use ``torch.cuda.max_memory_allocated``."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_flatten((args, kwargs))[0]
                  if isinstance(x, torch.Tensor) and x.device.type != "meta"}
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.device.type != "meta":
                st = x.untyped_storage()
                if st in self._seen or st.data_ptr() in inputs:  # a view or in-place result: no new memory
                    continue
                nbytes = st.nbytes()
                self._seen[st] = nbytes
                self.now += nbytes
                weakref.finalize(st, self._free, nbytes)
        self.peak = max(self.peak, self.now)
        return out


def storage_bytes(*tensor_groups) -> int:
    """Bytes of the distinct storages behind the given tensors (parameters, gradients, optimizer states ...)."""
    seen, total = set(), 0
    for group in tensor_groups:
        for x in group:
            if isinstance(x, torch.Tensor):
                st = x.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
    return total


@contextlib.contextmanager
def measure_peak(device: torch.device):
    """Yields a dict whose "peak" is, after the block, the peak bytes allocated during it above what was live
    before it (CUDA: the allocator's statistics; CPU: ``LiveTensorBytes``)."""
    out = {"peak": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - before
        return
    meter = LiveTensorBytes()
    with meter:
        yield out
    out["peak"] = meter.peak
