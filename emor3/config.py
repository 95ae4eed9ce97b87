"""Every run setting, once: small frozen dataclasses, parsed from TOML files and command-line flags.

A run's configuration is a ``Config`` made of one section per concern. Each field is a flag named
``--section.field`` (underscores may be written as dashes) whose help text is the field's ``help`` metadata;
``--config FILE.toml`` loads a file with the same sections first, and flags given after it override the file.
A few common settings also have short aliases (``--model``, ``--data``, ``--eval-data``, ``--algo``, ``--steps``,
``--out``, ``--seed``, ``--resume``). The resolved configuration is written to ``RUN_DIR/config.toml`` and reads
back to an equal ``Config``.

The objective's settings (clip range, KL, aggregation, dynamic sampling, ...) are the fields of ``Algorithm``,
written once. The named presets (``ALGORITHMS``: emo_r3, grpo, dapo, dr_grpo, gspo) set every one; ``GRPOConfig``
inherits them as ``--grpo.*`` flags defaulting to ``None``: "take the value from the ``--algo`` preset".
``Config.algorithm()`` resolves them, and the saved config records the resolved numbers, so a run is never
mislabelled.

Every setting with a closed set of values is typed by a ``Literal`` declared once below; parsing checks values
against it, and the code that dispatches on the names (the objective, the launcher, the rewards) reads the same
declaration. ``parse_args`` returns a resolved config (``Config.resolved``: the preset written in, every
model-dependent ``auto`` made) or exits with a usage error (status 2) naming each bad flag, before any work. This
module imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

# --------------------------------------------------------------------------------------------- choices
# Every setting with a closed set of values has its Literal here, declared once: parsing checks a value against it
# (typing.get_args), and the code that dispatches on the names reads the same declaration.

Dtype = Literal["float32", "bfloat16", "float16"]
ModelSize = Literal["tiny", "100m", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2-vl-2b", "3b", "7b", "2b",
                    "tiny-qwen3-vl", "tiny-qwen3-vl-thinking", "qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"]
DecoderTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GroupTarget = Literal["vision", "merger"]  # every linear layer of the vision blocks / of the patch merger(s)
OnBadSample = Literal["error", "skip"]
EmoScenesVariant = Literal["default", "shortcut", "conflict", "clips"]
EmoScenesEval = Literal["table", "validation"]
AlgoName = Literal["emo_r3", "grpo", "dapo", "dr_grpo", "gspo"]
KLKind = Literal["k1", "k2", "k3"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AdvScale = Literal["group", "batch", "none"]
RatioLevel = Literal["token", "sequence"]
Schedule = Literal["constant", "cosine"]
Compile = Literal["off", "on", "graph", "inductor", "eager", "aot_eager", "cudagraphs"]  # on: inductor; graph: a
# CUDA graph of the eager step; else the torch.compile backend
LossScope = Literal["mini-batch", "micro-batch"]
FormatRule = Literal["paper", "strict"]
AccuracyRule = Literal["exact", "normalized"]
Judge = Literal["policy", "reference"]
JudgeMode = Literal["sample", "logprob"]
MissingStep = Literal["release", "neutral"]
PluginAllNaN = Literal["warn", "error"]
WeightPreset = Literal["paper", "release"]  # --reward.weights: one of these, or NAME=W,NAME=W,...
CoherenceMatch = Literal["auto", "exact", "lenient"]  # --reward.coherence-match
JudgePrompt = Literal["auto", "release", "clean"]  # --reward.judge-prompt
Reference = Literal["sft", "init"]  # --grpo.reference: the KL term's frozen anchor
Logger = Literal["jsonl", "tensorboard", "wandb"]
Parallel = Literal["fsdp", "ddp"]
ReferenceMode = Literal["shard", "offload", "replicate"]
MixedPrecision = Literal["auto", "bf16", "fp32"]
Auto = Literal["auto"]  # a choice resolved when the config is parsed (``Config.resolved``)

DECODER_TARGETS: tuple[str, ...] = typing.get_args(DecoderTarget)
GROUP_TARGETS: tuple[str, ...] = typing.get_args(GroupTarget)
SEED_LIMIT = 2**32  # run seeds are below this, so every derived seed (emor3.grpo.rollout.stream_seed) fits int64


def choices(alias) -> tuple[str, ...]:
    """The names a Literal alias declares, flattened (``Literal["auto", LossScope]`` included)."""
    return typing.get_args(alias)


def parse_targets(targets) -> tuple[str, ...]:
    """LoRA targets as a comma-separated string or a sequence of names -> a checked tuple (order kept, no
    duplicates)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out = tuple(dict.fromkeys(targets))
    valid = DECODER_TARGETS + GROUP_TARGETS
    bad = [t for t in out if t not in valid]
    if bad or not out:
        raise ValueError(f"LoRA targets {list(out)}: unknown {bad}; valid names: {', '.join(valid)}")
    return out


def _f(default: Any, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f("", "Hugging Face checkpoint folder (Qwen2-VL / Qwen2.5-VL / Qwen3-VL). Empty: build the "
                   "tiny model.")
    tiny: ModelSize = _f("tiny", "Named tiny configuration used when no path is given (emor3.models.sizes: tiny, "
                   "tiny-qwen3-vl, tiny-qwen3-vl-thinking, ...).")
    tokenizer_vocab: int = _f(1024, "Vocabulary size of the tokenizer trained offline for the tiny model.")
    dtype: Dtype = _f("float32", "Dtype of the trained parameters and their AdamW state: float32 (fp32 master weights; "
                               "compute in bf16 through --run.mixed-precision) or bfloat16 (no master copy: updates "
                               "smaller than bf16's rounding step are lost, so not for training at small lr).")
    device: str = _f("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    freeze_vision: bool = _f(False, "Freeze the vision tower (the paper trains it).")
    gradient_checkpointing: bool = _f(False, "Recompute decoder activations in the backward pass to save memory.")
    min_pixels: int = _f(112 * 112, "Smallest image size in pixels after resizing (the paper: 512*512).")
    max_pixels: int = _f(112 * 112, "Largest image size in pixels after resizing (the paper: 2048*2048).")
    video_fps: float = _f(2.0, "Frames per second sampled from a clip (0: every frame).")
    video_max_frames: int = _f(16, "Most frames sampled from a clip.")
    video_max_pixels: int = _f(0, "Largest clip frame in pixels after resizing (0: --model.max-pixels); the "
                                  "smallest is --model.min-pixels.")
    lora_rank: int = _f(0, "LoRA rank r: train low-rank adapters on --model.lora-targets and freeze every other "
                           "weight; the KL reference is the model with its adapters off (0: full fine-tuning).")
    lora_alpha: float = _f(16.0, "LoRA alpha: the adapters' update is scaled by alpha / r.")
    lora_targets: list = _f(list(DECODER_TARGETS), "Layers that get LoRA adapters: any of the decoder's "
                            + ", ".join(DECODER_TARGETS) + "; vision (every linear layer of the vision blocks); "
                            "merger (the patch merger).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA adapters' input while training.")

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"--model.lora-rank {self.lora_rank}: must be >= 0 (0: full fine-tuning)")
        if not self.lora_alpha > 0:  # NaN fails too
            raise ValueError(f"--model.lora-alpha {self.lora_alpha}: must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--model.lora-dropout {self.lora_dropout}: must be in [0, 1)")
        try:
            targets = parse_targets(self.lora_targets)
        except ValueError as e:
            raise ValueError(f"--model.lora-targets: {e}") from None
        if self.lora_rank and self.freeze_vision and "vision" in targets:
            raise ValueError("--model.freeze-vision with the LoRA target 'vision': drop one of them")


@dataclass(frozen=True)
class DataConfig:
    train: str = _f("", "Training set: JSONL manifest, image-folder tree or EmoSet folder. Empty: EmoScenes.")
    eval: list = _f([], "Evaluation sets as NAME=PATH[:TAXONOMY][@in|@out], or the name of an EmoScenes split "
                        "(test, validation, ood_render, ...). Empty: --data.emoscenes-eval's splits. A PATH that "
                        "exists is read whole, ':' and all; PATH:TAXONOMY adds a taxonomy only where PATH alone "
                        "exists.")
    taxonomy: str = _f("", "Taxonomy of the training set (mikels8, emotion6, binary, ... or a TOML/JSON file).")
    on_bad_sample: OnBadSample = _f("error", "What to do with a bad sample: error (stop, naming it) or skip (count "
                                             "it).")
    max_prompt_length: int = _f(0, "Longest prompt in tokens, its image tokens included (the release: 2048). A longer "
                                   "one is a bad sample (prompt_too_long), found when the data is loaded: an error, or "
                                   "skipped and counted with --data.on-bad-sample skip; never cropped. 0: no limit.")
    cache_dir: str = _f(".cache/emoscenes", "Where EmoScenes images are cached on disk.")
    emoscenes_train: int = _f(1200, "EmoScenes training prompts.")
    emoscenes_test: int = _f(400, "EmoScenes in-domain test images (and as many validation images).")
    emoscenes_ood: int = _f(400, "EmoScenes images per out-of-domain split (compositional, ood_render, ...).")
    emoscenes_eval: EmoScenesEval = _f("table", "Which EmoScenes splits a run evaluates: table (the final table: "
                                       "test, compositional, ood_render, ood_unseen) or validation (the validation "
                                       "split only, to choose settings without reading test).")
    image_size: int = _f(112, "EmoScenes image side in pixels.")
    label_noise: float = _f(0.0, "EmoScenes label-noise rate.")
    emoscenes_variant: EmoScenesVariant = _f("default", "EmoScenes variant: default; shortcut (a badge whose colour "
                                             "shows the label on 90 % of train/test images); conflict (the training "
                                             "label follows the badge, which disagrees with the cues on 30 % of "
                                             "training images); emor3.toy.emoscenes; or clips (4-8 frame clips "
                                             "whose label needs the change over time; emor3.toy.emoscenes_clips).")
    cold_start: int = _f(100, "Samples with SET reference responses used for Cold-Start SFT (the paper: ~100).")


@dataclass(frozen=True)
class SFTConfig:
    steps: int = _f(1600, "Cold-Start SFT optimizer steps (0 skips SFT).")
    batch_size: int = _f(16, "Cold-Start SFT batch size (samples).")
    lr: float = _f(2e-3, "Cold-Start SFT learning rate (AdamW, cosine to 10%).")
    weight_decay: float = _f(0.01, "Cold-Start SFT weight decay.")
    judge_examples: bool = _f(True, "Also teach RER's yes/no and one-label answers from the cold-start responses "
                              "(needed by models trained from scratch; instruct checkpoints, as in the paper, can "
                              "set false).")
    instruct_steps: int = _f(3200, "The tiny model's instruct stage before Cold-Start SFT (docs/method.md, \"The "
                             "tiny default's starting point: an instruct stage\"): optimizer steps of captioning and "
                             "yes/no questions on EmoScenes images of every rendering, without emotion labels; built "
                             "once per setting and cached "
                             "(the default setting's ships with the package: `make instruct` rebuilds it). Runs from "
                             "a checkpoint (--model.path) skip it; 0 skips it.")
    instruct_images: int = _f(8000, "Scenes the instruct stage trains on, half in each rendering (their own seeds: no "
                              "benchmark image).")
    instruct_batch_size: int = _f(32, "Instruct-stage batch size (examples).")
    instruct_lr: float = _f(2e-3, "Instruct-stage learning rate (AdamW, cosine to 10%).")
    instruct_seed: int = _f(0, "Seed of the instruct stage (initial weights, scenes, example order), not --run.seed: "
                            "runs of every seed start from the same instruct checkpoint, as the paper's runs start "
                            "from one released model.")
    instruct_cache: str = _f(".cache/instruct", "Where instruct-stage checkpoints are cached, one folder per setting.")


@dataclass(frozen=True)
class Algorithm:
    """The objective's settings, one field each. A preset (``ALGORITHMS``) sets every field; as ``--grpo.*`` flags
    (``GRPOConfig`` inherits these fields) None means "the ``--grpo.algo`` preset's value"."""

    clip_low: float | None = _f(None, "Clip range below 1 (None: from the preset).")
    clip_high: float | None = _f(None, "Clip range above 1 (None: from the preset).")
    dual_clip: float | None = _f(None, "Dual-clip constant c > 1 for negative advantages (None: from the preset).")
    kl_coef: float | None = _f(None, "β, the KL-to-reference weight in the loss; 0 builds no reference (None: from "
                                     "the preset).")
    kl_kind: KLKind | None = _f(None, "KL estimator k1, k2 or k3 (None: from the preset).")
    loss_agg: LossAgg | None = _f(None, "Loss aggregation mode (None: from the preset).")
    adv_scale: AdvScale | None = _f(None, "Advantage scaling group, batch or none (None: from the preset).")
    ratio_level: RatioLevel | None = _f(None, "Importance ratio per token or sequence (None: from the preset).")
    dynamic_sampling: bool | None = _f(None, "DAPO dynamic sampling: drop groups whose rewards are all equal and "
                                             "refill from fresh prompts (None: from the preset).")
    overlong_buffer: float | None = _f(None, "DAPO soft overlong penalty: buffer as a fraction of max_new_tokens; 0 "
                                             "disables (None: from the preset).")
    reflection: bool | None = _f(None, "EMO-R3's RER rewards, consistency and coherence (None: from the preset).")


ALGORITHMS: dict[str, Algorithm] = {
    # EMO-R3's GRPO (docs/method.md "Training setup", from the authors' EasyR1 config): clip ε 0.2 / 0.3, dual clip
    # 3.0, k3 ("low_var_kl") in the loss with β = 0.01, token-mean aggregation, group std scaling, token-level ratio.
    "grpo": Algorithm(
        clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.01, kl_kind="k3",
        loss_agg="token-mean", adv_scale="group", ratio_level="token",
        dynamic_sampling=False, overlong_buffer=0.0, reflection=False,
    ),
    # DAPO (Yu et al. 2025): clip-higher 0.2 / 0.28 (sec. 3.1), no KL term (sec. 2.3), token-level loss (sec. 3.3),
    # dynamic sampling (sec. 3.2), soft overlong punishment (sec. 3.4: a 4k-token buffer in a 20k budget, kept here
    # as the same fraction, 0.2, of whatever max_new_tokens a run uses).
    "dapo": Algorithm(
        clip_low=0.2, clip_high=0.28, dual_clip=None, kl_coef=0.0, kl_kind="k3",
        loss_agg="token-mean", adv_scale="group", ratio_level="token",
        dynamic_sampling=True, overlong_buffer=0.2, reflection=False,
    ),
    # Dr.GRPO (Liu et al. 2025): no std scaling and a constant length normaliser (sec. 3.1); clip 0.2 as PPO;
    # no KL (their recipe sets β = 0).
    "dr_grpo": Algorithm(
        clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_kind="k3",
        loss_agg="seq-mean-token-sum-norm", adv_scale="none", ratio_level="token",
        dynamic_sampling=False, overlong_buffer=0.0, reflection=False,
    ),
    # GSPO (Zheng et al. 2025): sequence-level ratio, clip 3e-4 / 4e-4 (sec. 5.1), sequence-mean of token-means
    # (the sequence objective, eq. 5), group std scaling; no KL.
    "gspo": Algorithm(
        clip_low=3e-4, clip_high=4e-4, dual_clip=None, kl_coef=0.0, kl_kind="k3",
        loss_agg="seq-mean-token-mean", adv_scale="group", ratio_level="sequence",
        dynamic_sampling=False, overlong_buffer=0.0, reflection=False,
    ),
}
# EMO-R3 = the paper's GRPO plus the SET prompt (always used for emotion tasks) and the RER rewards.
ALGORITHMS["emo_r3"] = dataclasses.replace(ALGORITHMS["grpo"], reflection=True)
assert set(ALGORITHMS) == set(choices(AlgoName)), "AlgoName and ALGORITHMS name the same presets"


def get_algorithm(name: str) -> Algorithm:
    """The preset called ``name``; the error lists the valid names."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


@dataclass(frozen=True)
class GRPOConfig(Algorithm):
    """The GRPO stage's settings; the objective's (``Algorithm``'s fields) default to the ``algo`` preset."""

    algo: AlgoName = _f("emo_r3", "Algorithm preset: emo_r3, grpo, dapo, dr_grpo, gspo.")
    steps: int = _f(75, "GRPO steps (one rollout batch each).")
    prompts_per_step: int = _f(16, "Prompts per rollout batch (the paper: 512).")
    group_size: int = _f(8, "Samples per prompt, G (the paper: 4 or 8).")
    mini_batch_prompts: int = _f(16, "Prompts per optimizer update; rollout/mini batches = updates per step.")
    micro_batch_rows: int = _f(64, "Rows per forward/backward (gradient accumulation inside a mini-batch): at least "
                                   "--grpo.group-size, rows // G whole groups (a prompt's image encoded once for its "
                                   "G rows); below it, a divisor of G, and each group is split into G / rows "
                                   "micro-batches (the release: 4 rows per GPU).")
    shared_prefix: bool = _f(True, "Teacher-force each prompt once for its G completions in the update, the "
                                   "reference and the old log-probs (exact); false: N full prompt+completion rows.")
    epochs: int = _f(1, "Update epochs over each rollout batch, μ (the paper: 1).")
    max_new_tokens: int = _f(80, "Longest completion in tokens (the paper: 2048).")
    temperature: float = _f(1.0, "Rollout sampling temperature (the paper: 1.0).")
    top_p: float = _f(1.0, "Rollout nucleus sampling threshold (1 disables).")
    top_k: int = _f(0, "Rollout top-k (0 disables).")
    sample_chunk: int = _f(0, "Prompts sampled together under one generator seeded from (seed, stream position). "
                              "0: all of a rank's prompts in one batch (fastest); on CUDA the largest chunk whose "
                              "KV cache fits the free memory (emor3.memory). Any N that divides the prompts "
                              "per rank (1 always does) makes rollouts identical for any number of ranks.")
    compile: Compile = _f("off", "Speed up the rollout sampler's decode step: off; graph (CUDA only: the eager "
                                 "step captured as a CUDA graph and replayed, no compiler); on (torch.compile of the "
                                 "model's part with inductor) or another torch.compile backend: inductor, eager "
                                 "(trace only), aot_eager, cudagraphs.")
    shared_prefix_decode: bool = _f(False, "Rollout decode reads each prompt's KV cache once for its G samples "
                                           "(emor3.models.qwen_vl.GroupedKVCache) instead of copying it to G rows; "
                                           "eager decoding only. Not bit-exact (attention sums in another order).")
    lr: float = _f(3e-4, "AdamW learning rate (the paper: 2e-6 for the 3B model).")
    weight_decay: float = _f(0.01, "AdamW weight decay (the paper: 0.01).")
    warmup_steps: int = _f(0, "Linear warm-up steps (the paper: 0).")
    schedule: Schedule = _f("constant", "Learning-rate schedule after warm-up: constant or cosine.")
    grad_clip: float = _f(1.0, "Gradient-norm clip (the paper: 1.0).")
    max_refill: int = _f(3, "Dynamic sampling: extra rollout rounds allowed to refill filtered-out groups.")
    loss_scope: Literal[Auto, LossScope] = _f(
        "auto", "Over what the loss normaliser counts: mini-batch (the whole mini-batch over all ranks: "
        "micro-batching does not change the gradient), micro-batch (the release: each micro-batch's own count, its "
        "loss divided by the micro-batches per rank and averaged over ranks), auto (micro-batch with a checkpoint, "
        "mini-batch with the tiny model; resolved when the config is parsed).")
    reference: Reference = _f("sft", "The KL term's frozen anchor: sft (the model after Cold-Start SFT, the model GRPO "
                                     "starts from) or init (the model before it, as the release anchors to its initial "
                                     "checkpoint). With LoRA, init keeps a frozen copy of that model.")


@dataclass(frozen=True)
class RewardConfig:
    weights: str = _f("paper", "Reward weights: paper, release, or NAME=W,NAME=W,... for any components.")
    format: FormatRule = _f("paper", "Format rule: paper (the paper's regex) or strict (also rejects empty steps "
                                     "etc.).")
    accuracy: AccuracyRule = _f("exact", "Accuracy rule: exact (the paper's lower-case match) or normalized "
                                         "(synonyms).")
    judge: Judge = _f("policy", "Who answers the RER questions: policy (the paper) or reference (frozen copy).")
    judge_mode: JudgeMode = _f("sample", "RER scoring: sample (the paper: one reply at T=0.6) or logprob (no "
                                         "sampling).")
    judge_max_new_tokens: int = _f(0, "Longest judge reply in sample mode. 0: 32 with a checkpoint (--model.path; an "
                                      "instruct model may answer 'Based on the image, yes'), 8 with the tiny model, "
                                      "which answers in one word (docs/method.md, \"Where the paper is silent\").")
    judge_share_prefix: bool = _f(True, "Prefill each prompt's judge prefix (chat header, image, question) once for "
                                        "its G consistency questions, then only each step 1; same scores as "
                                        "prefilling every question whole (off).")
    missing_step: Literal[Auto, MissingStep] = _f(
        "auto", "RER score where the steps a judge reads are missing: release (consistency 0, coherence 0.5, as the "
        "release's 'None' answer scores), neutral (both 0.5), auto (release with a checkpoint, neutral with the tiny "
        "model; resolved when the config is parsed).")
    coherence_match: CoherenceMatch = _f("auto", "How a sampled coherence reply is matched to the label: lenient "
                                                 "(word level: 'Sadness.' and '**sadness**' count), exact (the "
                                                 "release: 1 only when reply.lower() == label.lower(), 0.5 for an "
                                                 "empty reply or 'none'), auto (exact with --reward.weights release, "
                                                 "else lenient).")
    judge_prompt: JudgePrompt = _f("auto", "RER judge prompt text: clean (steps without their tags, a newline after "
                                           "each part), release (the release's text: tags kept, no separator after the "
                                           "consistency question), auto (release with --reward.weights release, else "
                                           "clean).")
    plugins: list = _f([], "Extra reward functions as module:function=WEIGHT (TRL signature).")
    plugin_all_nan: PluginAllNaN = _f("warn", "A plug-in that scores no row of a batch (NaN everywhere): warn (once "
                                              "per plug-in, counted in the metrics) or error (stop the run).")


@dataclass(frozen=True)
class EvalConfig:
    temperature: float = _f(0.6, "Evaluation sampling temperature (the paper: 0.6; 0 is greedy).")
    top_p: float = _f(0.95, "Evaluation nucleus threshold (the paper: 0.95).")
    max_new_tokens: int = _f(80, "Longest evaluation completion in tokens.")
    batch_size: int = _f(64, "Prompts per evaluation batch.")


@dataclass(frozen=True)
class RunConfig:
    out: str = _f("runs/default", "Run folder: config, metrics.jsonl, samples, checkpoints, results.")
    seed: int = _f(0, "Seed for every random choice of the run.")
    resume: str = _f("", "Run folder to resume (its newest checkpoint that loads), or RUN_DIR/checkpoint-<step> to "
                         "resume from that one; its config.toml is the base config and the run's settings stay.")
    save_every: int = _f(0, "Write a checkpoint every N steps (0: only at the end and on SIGINT/SIGTERM).")
    keep_checkpoints: int = _f(2, "Numbered checkpoints (RUN_DIR/checkpoint-<step>) kept; older ones are deleted.")
    overwrite: bool = _f(False, "Replace the run already in --run.out (without it a command refuses a non-empty "
                                "run folder). Never saved in config.toml.")
    sample_every: int = _f(10, "Write the completions of a step's first two prompts to samples.jsonl (text, image, "
                               "label, every reward term, the judge's replies) every N steps and at the last step.")
    logger: Logger = _f("jsonl", "Extra metrics sink besides metrics.jsonl: jsonl (none), tensorboard or wandb.")
    threads: int = _f(0, "CPU threads for torch (0: torch's default).")
    progress: bool = _f(True, "Show tqdm progress bars.")
    parallel: Parallel = _f("fsdp", "Under torchrun: fsdp (FSDP2, one unit per decoder layer / vision block) or ddp.")
    reference: ReferenceMode = _f("shard", "Frozen reference under FSDP: shard, offload (shards in CPU memory) or "
                                           "replicate.")
    mixed_precision: MixedPrecision = _f(
        "auto", "Compute dtype of policy, reference and sampler: auto (bf16 on GPU, fp32 on CPU), bf16, fp32. "
        "Parameters stay in --model.dtype: FSDP2 casts its fp32 shards (MixedPrecisionPolicy, fp32 gradient "
        "reduce), one process and DDP autocast.")
    dist_timeout: float = _f(600.0, "Seconds a collective waits for the other ranks before the job fails (a crashed rank).")
    dist_setup_timeout: float = _f(7200.0, "Seconds ranks wait for rank 0's setup (data cache, tiny model, SFT, baseline eval).")
    dry_run: bool = _f(False, "Print the per-process memory plan of this config (emor3.memory) and exit: nothing is "
                              "loaded or trained. Every run prints the same table when it starts.")
    dry_run_world: int = _f(0, "Processes the --dry-run plan is for (0: this launch's number of processes).")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.model.lora_rank and self.reward.judge == "reference":
            raise ValueError("--reward.judge reference is not supported with --model.lora-rank (a LoRA run's "
                             "reference is the policy with its adapters off); use --reward.judge policy (the paper)")

    def algorithm(self) -> Algorithm:
        """The objective settings: the ``grpo.algo`` preset with every non-None ``grpo`` override applied."""
        overrides = {f.name: getattr(self.grpo, f.name) for f in fields(Algorithm) if getattr(self.grpo, f.name) is not None}
        return dataclasses.replace(get_algorithm(self.grpo.algo), **overrides)

    def needs_reference(self) -> bool:
        """Whether GRPO keeps a frozen reference model: β > 0, or the reference judges RER."""
        algo = self.algorithm()
        return algo.kl_coef > 0 or (algo.reflection and self.reward.judge == "reference")

    def resolved(self) -> "Config":
        """This config with the preset's objective numbers written into ``grpo`` and every "auto" that depends on
        the model made: what a run records and every stage reads. Where the paper is silent, a checkpoint run
        (--model.path) follows the authors' release and the tiny default keeps the choices its recorded results
        were made with (docs/method.md, "Where the paper is silent"):
        judge_max_new_tokens 0 -> 32 with a checkpoint, 8 with the tiny model; missing_step auto -> release / neutral;
        loss_scope auto -> micro-batch / mini-batch. With the release's reward weights the judge follows the release
        too: coherence_match auto -> exact, else lenient; judge_prompt auto -> release, else clean. Resolving a
        resolved config changes nothing."""
        ckpt = bool(self.model.path)
        r, g = self.reward, self.grpo
        grpo = dataclasses.replace(g, **dataclasses.asdict(self.algorithm()), loss_scope=g.loss_scope if
                                   g.loss_scope != "auto" else ("micro-batch" if ckpt else "mini-batch"))
        reward = dataclasses.replace(
            r, judge_max_new_tokens=r.judge_max_new_tokens or (32 if ckpt else 8),
            missing_step=r.missing_step if r.missing_step != "auto" else ("release" if ckpt else "neutral"),
            coherence_match=r.coherence_match if r.coherence_match != "auto" else (
                "exact" if r.weights == "release" else "lenient"),
            judge_prompt=r.judge_prompt if r.judge_prompt != "auto" else (
                "release" if r.weights == "release" else "clean"))
        return dataclasses.replace(self, grpo=grpo, reward=reward)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
_INHERITED = {"grpo": {f.name for f in fields(Algorithm)}}

# Short flags for the settings people change most: alias -> (section, field).
ALIASES = {
    "model": ("model", "path"),
    "data": ("data", "train"),
    "eval-data": ("data", "eval"),
    "algo": ("grpo", "algo"),
    "steps": ("grpo", "steps"),
    "out": ("run", "out"),
    "seed": ("run", "seed"),
    "resume": ("run", "resume"),
    "on-bad-sample": ("data", "on_bad_sample"),
    "dry-run": ("run", "dry_run"),
    "dry-run-world": ("run", "dry_run_world"),
}


# --------------------------------------------------------------------------------------------- conversion


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _field_type(cls: type, name: str):
    """A field's type without its Optional, and whether None is allowed."""
    t = _hints(cls)[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    optional = typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in typing.get_args(t)
    return (args[0] if optional else t), optional


def _coerce(sec: str, name: str, value: Any, where: str) -> Any:
    """``value`` (a flag's text or a TOML value) as field ``sec.name``'s type; the error names the setting."""
    t, optional = _field_type(SECTIONS[sec], name)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{where}: {setting_name(sec, name)} cannot be None")
    try:
        if typing.get_origin(t) is Literal:
            if not isinstance(value, str) or value not in choices(t):
                raise ValueError(f"{value!r}: must be one of {', '.join(choices(t))}")
            return value
        if t is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if t is list or typing.get_origin(t) is list:
            if isinstance(value, str):
                return [v for v in value.split(",") if v] if value else []
            return list(value)
        if t is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"not an integer: {value!r}")
        v = t(value)
        if t is float and not math.isfinite(v):
            raise ValueError(f"{value!r}: must be a finite number")
        return v
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {setting_name(sec, name)}: bad value: {e}") from None


def config_from_dict(d: dict, where: str = "config") -> Config:
    """Build a Config from nested dicts {section: {field: value}}; unknown names are an error naming them."""
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown sections {unknown}; valid: {sorted(SECTIONS)}")
    sections = {}
    for sec, cls in SECTIONS.items():
        values = d.get(sec, {}) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{where}: [{sec}] must be a table of settings")
        names = {f.name for f in fields(cls)}
        bad = sorted(set(values) - names)
        if bad:
            raise ValueError(f"{where}: unknown settings in [{sec}]: {bad}; valid: {sorted(names)}")
        sections[sec] = cls(**{k: _coerce(sec, k, v, where) for k, v in values.items()})
    return Config(**sections)


def config_to_dict(cfg: Config) -> dict:
    return {sec: dataclasses.asdict(getattr(cfg, sec)) for sec in SECTIONS}


# --------------------------------------------------------------------------------------------- validation


class ConfigError(ValueError):
    """Settings that cannot run; the message names each bad flag (and TOML key), its value and what is allowed."""


# The allowed range of each numeric setting (a choice's allowed names are its field's Literal). ``Config.algorithm()``'s
# resolved objective is checked with the same rules (its keys are in ``grpo``).
# (low, low_inclusive, high, high_inclusive, why); None: unbounded on that side
_RANGES: dict[tuple[str, str], tuple] = {
    ("model", "tokenizer_vocab"): (1, True, None, False, ""),
    ("model", "min_pixels"): (1, True, None, False, ""),
    ("model", "max_pixels"): (1, True, None, False, ""),
    ("model", "video_fps"): (0, True, None, False, "0: every frame"),
    ("model", "video_max_frames"): (2, True, None, False, "a temporal patch spans two frames"),
    ("model", "video_max_pixels"): (0, True, None, False, "0: --model.max-pixels"),
    ("data", "emoscenes_train"): (1, True, None, False, ""),
    ("data", "emoscenes_test"): (0, True, None, False, ""),
    ("data", "emoscenes_ood"): (0, True, None, False, ""),
    ("data", "image_size"): (1, True, None, False, ""),
    ("data", "label_noise"): (0, True, 1, True, ""),
    ("data", "cold_start"): (0, True, None, False, ""),
    ("data", "max_prompt_length"): (0, True, None, False, "0: no limit"),
    ("sft", "steps"): (0, True, None, False, "0 skips Cold-Start SFT"),
    ("sft", "batch_size"): (1, True, None, False, ""),
    ("sft", "lr"): (0, False, None, False, ""),
    ("sft", "weight_decay"): (0, True, None, False, ""),
    ("sft", "instruct_steps"): (0, True, None, False, "0 skips the instruct stage"),
    ("sft", "instruct_images"): (1, True, None, False, ""),
    ("sft", "instruct_batch_size"): (1, True, None, False, ""),
    ("sft", "instruct_lr"): (0, False, None, False, ""),
    ("sft", "instruct_seed"): (0, True, None, False, ""),
    ("run", "seed"): (0, True, SEED_LIMIT, False, "every seed derived from it fits a 64-bit generator seed"),
    ("grpo", "clip_low"): (0, True, 1, False, "the ratio is clipped below at 1 - clip_low"),
    ("grpo", "clip_high"): (0, True, None, False, ""),
    ("grpo", "dual_clip"): (1, False, None, False, "the dual clip bounds the loss of negative advantages at c > 1"),
    ("grpo", "kl_coef"): (0, True, None, False, ""),
    ("grpo", "overlong_buffer"): (0, True, 1, False, "a fraction of max_new_tokens"),
    ("grpo", "steps"): (1, True, None, False, "a run trains at least one step"),
    ("grpo", "prompts_per_step"): (1, True, None, False, ""),
    ("grpo", "group_size"): (2, True, None, False, "GRPO's advantage compares each completion with the others of "
                                                   "its group"),
    ("grpo", "mini_batch_prompts"): (1, True, None, False, ""),
    ("grpo", "micro_batch_rows"): (1, True, None, False, ""),
    ("grpo", "epochs"): (1, True, None, False, ""),
    ("grpo", "max_new_tokens"): (1, True, None, False, ""),
    ("grpo", "temperature"): (0, False, None, False, "training rollouts are sampled, and their log-probabilities at "
                                                     "T = 0 are undefined (every update would be NaN)"),
    ("grpo", "top_p"): (0, False, 1, True, "1 disables nucleus sampling"),
    ("grpo", "top_k"): (0, True, None, False, "0 disables top-k"),
    ("grpo", "sample_chunk"): (0, True, None, False, ""),
    ("grpo", "lr"): (0, True, None, False, ""),
    ("grpo", "weight_decay"): (0, True, None, False, ""),
    ("grpo", "warmup_steps"): (0, True, None, False, ""),
    ("grpo", "grad_clip"): (0, False, None, False, ""),
    ("grpo", "max_refill"): (0, True, None, False, ""),
    ("reward", "judge_max_new_tokens"): (0, True, None, False, "0: chosen by the model"),
    ("eval", "temperature"): (0, True, None, False, "0 is greedy"),
    ("eval", "top_p"): (0, False, 1, True, ""),
    ("eval", "max_new_tokens"): (1, True, None, False, ""),
    ("eval", "batch_size"): (1, True, None, False, ""),
    ("run", "save_every"): (0, True, None, False, "0: only at the end and on a signal"),
    ("run", "sample_every"): (0, True, None, False, "0 writes no samples"),
    ("run", "keep_checkpoints"): (1, True, None, False, ""),
    ("run", "threads"): (0, True, None, False, "0: torch's default"),
    ("run", "dry_run_world"): (0, True, None, False, "0: this launch's number of processes"),
    ("run", "dist_timeout"): (0, False, None, False, ""),
    ("run", "dist_setup_timeout"): (0, False, None, False, ""),
}


def setting_name(sec: str, name: str) -> str:
    """How a setting is written: its flag (and short alias) and its TOML key."""
    alias = [f"--{a}" for a, target in ALIASES.items() if target == (sec, name)]
    return f"--{sec}.{name.replace('_', '-')}{' / ' + alias[0] if alias else ''} ([{sec}] {name})"


def _range_text(lo, lo_inc, hi, hi_inc) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>=' if lo_inc else '>'} {lo}")
    if hi is not None:
        parts.append(f"{'<=' if hi_inc else '<'} {hi}")
    return " and ".join(parts)


def parse_eval_spec(spec: str) -> tuple[str, str, str | None, str]:
    """NAME=PATH[:TAXONOMY][@in|@out] -> (name, path, taxonomy or None, domain); domain defaults to out.
    A PATH that exists is taken whole, ':' included; otherwise TAXONOMY is what follows the last ':' when it holds
    no path separator (a name such as binary, or a TOML/JSON file in the working folder)."""
    if "=" not in spec:
        raise ValueError(f"--data.eval entry {spec!r}: expected NAME=PATH[:TAXONOMY][@in|@out]")
    name, rest = spec.split("=", 1)
    domain = "out"
    if (rest.endswith("@in") or rest.endswith("@out")) and not Path(rest).exists():
        rest, domain = rest.rsplit("@", 1)
    taxonomy = None
    head, sep, tail = rest.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail and not Path(rest).exists():
        rest, taxonomy = head, tail
    return name, rest, taxonomy, domain


def _dataset_path_exists(path: str) -> bool:
    """A dataset path exists as written, or as PATH@SPLIT where PATH exists (a split of a published layout)."""
    head, at, tail = path.rpartition("@")
    return Path(path).exists() or bool(at and head and tail and Path(head).exists())


def path_problems(cfg: Config) -> list[str]:
    """The files and folders the settings name that must exist before the run starts, one line each. A dry run
    reads only the model's config.json."""
    problems = []
    m, d = cfg.model, cfg.data
    if m.path and not (Path(m.path) / "config.json").is_file():
        what = "no config.json in that folder" if Path(m.path).is_dir() else "no such folder"
        problems.append(f"{setting_name('model', 'path')} = {m.path!r}: {what} (a Hugging Face checkpoint folder)")
    if cfg.run.dry_run:
        return problems
    if d.train and not _dataset_path_exists(d.train):
        problems.append(f"{setting_name('data', 'train')} = {d.train!r}: no such file or folder")
    if d.taxonomy.endswith((".toml", ".json")) and not Path(d.taxonomy).is_file():
        problems.append(f"{setting_name('data', 'taxonomy')} = {d.taxonomy!r}: no such file")
    for spec in d.eval:
        if "=" in spec and spec.split("=", 1)[0] and spec.split("=", 1)[1]:
            _, path, taxonomy, _ = parse_eval_spec(spec)
            if not _dataset_path_exists(path):
                problems.append(f"{setting_name('data', 'eval')} entry {spec!r}: no such file or folder {path!r}")
            elif taxonomy and taxonomy.endswith((".toml", ".json")) and not Path(taxonomy).is_file():
                problems.append(f"{setting_name('data', 'eval')} entry {spec!r}: no such taxonomy file {taxonomy!r}")
    return problems


def config_problems(cfg: Config) -> list[str]:
    """Every setting of ``cfg`` that cannot run, one line each (empty: the config is valid)."""
    problems = []

    def bad(sec: str, name: str, value, allowed: str) -> None:
        problems.append(f"{setting_name(sec, name)} = {value!r}: {allowed}")

    resolved = {sec: dataclasses.asdict(getattr(cfg, sec)) for sec in SECTIONS}
    if cfg.grpo.algo in ALGORITHMS:  # the objective as it will run: the preset with the overrides applied
        resolved["grpo"].update(dataclasses.asdict(cfg.algorithm()))
    for sec, cls in SECTIONS.items():  # types: every choice one of its Literal's names, every float finite
        for f in fields(cls):
            t, _ = _field_type(cls, f.name)
            value = resolved[sec][f.name]
            if value is None:
                continue
            if typing.get_origin(t) is Literal and value not in choices(t):
                bad(sec, f.name, value, f"must be one of {', '.join(choices(t))}")
            elif t is float and not (isinstance(value, (int, float)) and math.isfinite(value)):
                bad(sec, f.name, value, "must be a finite number")
    for (sec, name), (lo, lo_inc, hi, hi_inc, why) in _RANGES.items():
        value = resolved[sec].get(name)
        if value is None or isinstance(value, bool):
            continue
        ok = (lo is None or (value >= lo if lo_inc else value > lo)) and (hi is None or (value <= hi if hi_inc else value < hi))
        if not ok or value != value:  # NaN fails every comparison
            bad(sec, name, value, f"must be {_range_text(lo, lo_inc, hi, hi_inc)}" + (f" ({why})" if why else ""))

    m, g = cfg.model, cfg.grpo
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", m.device):
        bad("model", "device", m.device, "must be auto, cpu, cuda, cuda:N or mps")
    if m.min_pixels > m.max_pixels >= 1:
        bad("model", "min_pixels", m.min_pixels, f"must be <= --model.max-pixels ({m.max_pixels})")
    if g.prompts_per_step >= 1 and g.mini_batch_prompts >= 1 and g.prompts_per_step % g.mini_batch_prompts:
        bad("grpo", "prompts_per_step", g.prompts_per_step,
            f"must be a multiple of --grpo.mini-batch-prompts ({g.mini_batch_prompts}): every update takes whole "
            "mini-batches of the rollout batch")
    if 1 <= g.micro_batch_rows < g.group_size and g.group_size % g.micro_batch_rows:
        bad("grpo", "micro_batch_rows", g.micro_batch_rows,
            f"must divide --grpo.group-size ({g.group_size}) when smaller than it: a micro-batch holds whole groups "
            "or an equal slice of one")
    for sec, name in (("run", "out"), ("data", "cache_dir"), ("sft", "instruct_cache")):
        if not getattr(getattr(cfg, sec), name).strip():
            bad(sec, name, getattr(getattr(cfg, sec), name), "must name a folder")
    if cfg.reward.weights not in choices(WeightPreset):
        for part in cfg.reward.weights.split(","):
            name, sep, w = part.partition("=")
            try:
                ok = bool(sep and name.strip()) and math.isfinite(float(w))
            except ValueError:
                ok = False
            if not ok:
                bad("reward", "weights", cfg.reward.weights, f"must be {' or '.join(choices(WeightPreset))} or "
                    f"NAME=W,NAME=W,... with finite weights (bad entry {part!r})")
                break
    for spec in cfg.reward.plugins:
        target, eq, weight = spec.partition("=")
        module, colon, func = target.partition(":")
        try:
            finite = not eq or math.isfinite(float(weight))
        except ValueError:
            finite = False
        if not (colon and module.strip() and func.strip() and finite):
            bad("reward", "plugins", spec, "each entry must be package.module:function or "
                "package.module:function=WEIGHT with a finite weight")
    names = []
    for spec in cfg.data.eval:
        if "=" not in spec:  # the name of a built-in split, checked when the data is built
            names.append(spec)
        elif not spec.split("=", 1)[0] or not spec.split("=", 1)[1]:
            bad("data", "eval", spec, "each entry must be NAME=PATH[:TAXONOMY][@in|@out] or an EmoScenes split")
        else:
            names.append(spec.split("=", 1)[0])
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        bad("data", "eval", ",".join(cfg.data.eval), f"each set needs its own name ({', '.join(dup)} given twice): "
            "results.json keeps one row per name")
    return problems


def validate_config(cfg: Config) -> Config:
    """``cfg`` if every setting can run, else a ConfigError listing every bad one."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))
    return cfg


def load_toml(path: str | Path, what: str = "config file") -> dict:
    """A TOML file as nested dicts: run configs here, user taxonomies in ``emor3.data.taxonomy``. Errors name the
    file and what is wrong. Python 3.11+ reads TOML with tomllib; 3.10 needs the tomli package."""
    path = Path(path)
    try:
        import tomllib  # imported here, not at the top: a missing reader is an error only for whoever reads TOML
    except ModuleNotFoundError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise RuntimeError(f"{path}: reading TOML needs Python 3.11+ (tomllib) or the 'tomli' package "
                               f"(pip install tomli)") from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def dump_toml(cfg: Config) -> str:
    """TOML text that ``load_toml`` + ``config_from_dict`` read back to an equal Config (None fields omitted)."""
    lines = []
    for sec, values in config_to_dict(cfg).items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as TOML (through a temporary file and a rename). ``run.overwrite`` is saved false: a saved
    config never carries the permission to replace a run."""
    path = Path(path)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, overwrite=False))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_toml(cfg))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------- CLI


def build_parser(prog: str, description: str, sections: tuple[str, ...] = tuple(SECTIONS)) -> argparse.ArgumentParser:
    """A parser with ``--config``, the aliases, and one ``--section.field`` flag per field of ``sections``."""
    p = argparse.ArgumentParser(prog=prog, description=description, usage="%(prog)s [--config FILE.toml] [--SECTION.FIELD VALUE ...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.toml", help="Load settings from a TOML file; later flags override it.")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="Show the traceback of an OS error (a read-only folder, a full disk) instead of one line.")
    for alias, (sec, name) in ALIASES.items():
        if sec in sections:
            flag = _field_type(SECTIONS[sec], name)[0] is bool  # a bare --dry-run means true
            p.add_argument(f"--{alias}", dest=f"{sec}.{name}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=f"Alias of --{sec}.{name.replace('_', '-')}.",
                           **({"nargs": "?", "const": "true"} if flag else {}))
    if "run" in sections:
        p.add_argument("--overwrite", dest="run.overwrite", action="store_const", const=True, default=argparse.SUPPRESS,
                       help="Alias of --run.overwrite true: replace the run already in the run folder.")
    for sec in sections:
        group = p.add_argument_group(f"[{sec}]")
        # a section's own settings first, then those it inherits (GRPOConfig: the objective's)
        for f in sorted(fields(SECTIONS[sec]), key=lambda f: f.name in _INHERITED.get(sec, ())):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            t, _ = _field_type(SECTIONS[sec], f.name)
            metavar = "BOOL" if t is bool else ("A,B,..." if t is list else t.__name__.upper())
            group.add_argument(f"--{sec}.{f.name.replace('_', '-')}", f"--{sec}.{f.name}", dest=f"{sec}.{f.name}",
                               default=argparse.SUPPRESS, metavar=metavar,
                               help=f"{f.metadata['help']} (default: {default!r})".replace('%', '%%'))
    return p


def resume_run_dir(resume: str | Path) -> Path:
    """The run folder of ``--resume``: the folder itself, or the run a ``RUN_DIR/checkpoint-<step>`` belongs to."""
    p = Path(resume)
    return p.parent if re.fullmatch(r"checkpoint-\d+", p.name) and (p.parent / "config.toml").is_file() else p


def parse_args(argv: list[str] | None, prog: str, description: str, default_out: str | None = None, *,
               check_paths: bool = True) -> Config:
    """Parse flags (and ``--config``) into a validated, resolved Config (``Config.resolved``). A bad setting is a
    usage error (exit 2) naming the flag or file and what is allowed, raised before anything is written; so is a
    file or folder a setting names that does not exist (``path_problems``; ``check_paths=False``: a command read
    before the steps that make its inputs have run).

    ``default_out``: the entry point's own run folder when neither a flag nor the config file names one.
    ``--resume RUN_DIR`` continues the run in its own folder, with its saved config.toml as the base settings."""
    parser = build_parser(prog, description)
    ns = vars(parser.parse_args(argv))
    config_file = ns.pop("config", None)
    ns.pop("debug", None)  # read by the entry point (emor3.folders.wants_debug), not a run setting
    resume = ns.get("run.resume")
    if resume:
        if not Path(resume).is_dir():
            parser.error(f"{setting_name('run', 'resume')} = {resume!r}: no such run folder")
        run_dir = resume_run_dir(resume)
        out = ns.get("run.out")
        if out is not None and Path(out).resolve() != Path(run_dir).resolve():
            parser.error(f"--resume {resume} continues the run in its own folder, but --run.out is {out}: drop "
                         f"--out, or copy {run_dir} to {out} and resume that")
        ns["run.out"] = str(run_dir)
        if not config_file:  # --resume RUN_DIR continues with the run's own saved settings
            config_file = str(Path(run_dir) / "config.toml")
    try:
        raw = load_toml(config_file) if config_file else {}
        base = config_from_dict(raw, config_file) if config_file else Config()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        parser.error(str(e))
    if default_out and not (isinstance(raw.get("run"), dict) and "out" in raw["run"]):
        ns.setdefault("run.out", default_out)
    d = config_to_dict(base)
    for key, value in ns.items():
        sec, name = key.split(".", 1)
        d[sec][name] = value
    try:
        cfg = validate_config(config_from_dict(d, "command line")).resolved()
    except ValueError as e:
        parser.error(str(e))
    missing = path_problems(cfg) if check_paths else []
    if missing:
        parser.error("missing inputs:\n  " + "\n  ".join(missing))
    return cfg
