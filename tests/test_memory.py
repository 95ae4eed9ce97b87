"""emor3.memory: the per-process memory plan against what the tiny model really holds on CPU.

Measured: the live tensor bytes (every storage an operator creates, until it is freed) during a rollout (``sample``
with its KV cache) and during one micro-batch's teacher-forced forward, backward and AdamW step, on top of the
parameters, reference and optimizer state held throughout. The estimate must be within 15 % of each, in fp32 and
in bf16 autocast over fp32 weights, with and without gradient checkpointing, for two shapes. Also: exact parameter
counts, FSDP's division by the world size, and the sample-chunk choice under a memory budget.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from emor3.engine.scoring import completion_logprobs, prompt_slice
from emor3.engine.sampler import sample
from emor3.memory import (
    LiveTensorBytes, RunPlan, estimate, image_patches_for, largest_sample_chunk, measure_peak, param_counts,
    storage_bytes,
)
from emor3.models import PromptBatch, QwenVL, mrope_position_ids, tiny_config

TOLERANCE = 0.15
REPO = Path(__file__).resolve().parents[1]


def prompt_batch(cfg, B: int, text_tokens: int, grid: tuple[int, int, int]) -> PromptBatch:
    """B prompts of `text_tokens` text tokens around one image of patch grid `grid` (t, h, w)."""
    M = grid[0] * grid[1] * grid[2] // cfg.vision.spatial_merge_size ** 2
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(B):
        t = torch.randint(0, cfg.text.vocab_size - 20, (text_tokens,), generator=g).tolist()
        rows.append(t[:3] + [cfg.vision_start_token_id] + [cfg.image_token_id] * M + [cfg.vision_end_token_id]
                    + t[3:])
    ids = torch.tensor(rows)  # (B, P)
    am = torch.ones_like(ids)  # (B, P)
    grids = torch.tensor([grid] * B)  # (B, 3)
    pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=cfg.image_token_id)
    pix = torch.randn(B * grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g)  # (patches, C*t*p*p)
    return PromptBatch(ids, am, pos, pix, grids, nxt, [1] * B)


def measured_and_estimated(*, autocast: bool, checkpointing: bool, shared=False, B=4, G=4, T=32, text_tokens=40, grid=(1, 8, 8),
                           micro_rows=8, **sizes):
    cfg = tiny_config("tiny", **sizes)
    model = QwenVL(cfg).init_weights(0).set_gradient_checkpointing(checkpointing)
    ref_dtype = torch.bfloat16 if autocast else torch.float32  # the reference is a copy in the compute dtype
    reference = QwenVL(cfg).init_weights(0).to(ref_dtype).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = prompt_batch(cfg, B, text_tokens, grid)
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=autocast)
    prompts = torch.arange(micro_rows // G)
    completions = torch.randint(0, cfg.text.vocab_size - 20, (micro_rows, T), generator=torch.Generator().manual_seed(1))

    def update():
        model.train()
        with torch.autocast(**amp):
            lp, ent = completion_logprobs(model, prompt_slice(batch, prompts), prompts.repeat_interleave(G),
                                          completions, torch.ones(micro_rows, T), return_entropy=True,
                                          shared_prefix=shared)
        (lp.mean() + 0.1 * ent.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    update()  # AdamW's moments exist from here on, as in a run
    held = storage_bytes(model.parameters(), reference.parameters(),
                         [s for state in opt.state.values() for s in state.values()])
    model.eval()
    with measure_peak(torch.device("cpu")) as rollout, torch.autocast(**amp):
        sample(model, batch, group_size=G, max_new_tokens=T, generator=0)  # no stop ids: all T tokens
    with measure_peak(torch.device("cpu")) as upd:
        update()
    plan = RunPlan(prompts_per_rank=B, group_size=G, prompt_tokens=batch.input_ids.shape[1],
                   image_patches=grid[0] * grid[1] * grid[2], max_new_tokens=T, micro_batch_rows=micro_rows,
                   param_dtype="float32", compute_dtype="bfloat16" if autocast else "float32",
                   reference="replicate", gradient_checkpointing=checkpointing, shared_prefix=shared)
    est = estimate(cfg, plan)
    return (held + rollout["peak"], est.rollout_peak), (held + upd["peak"], est.update_peak)


CASES = [
    dict(autocast=False, checkpointing=False),
    dict(autocast=True, checkpointing=True),
    dict(autocast=False, checkpointing=True, B=2, G=8, T=64, text_tokens=100, grid=(1, 16, 12), micro_rows=16),
    dict(autocast=False, checkpointing=True, shared=True, B=2, G=8, T=32, text_tokens=100, grid=(1, 16, 12),
         micro_rows=16),
    dict(autocast=True, checkpointing=False, hidden_size=256, intermediate_size=768, num_heads=8, vocab_size=4096,
         T=48),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_estimate_matches_measured_peaks_on_the_tiny_model(case):
    torch.manual_seed(0)
    (m_roll, e_roll), (m_upd, e_upd) = measured_and_estimated(**case)
    for phase, m, e in (("rollout", m_roll, e_roll), ("update", m_upd, e_upd)):
        assert abs(e / m - 1) < TOLERANCE, (f"{phase} phase: estimated {e / 2**20:.2f} MiB, measured "
                                            f"{m / 2**20:.2f} MiB ({e / m:.3f}x)")


def test_param_counts_are_exact():
    for name in ("tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b"):
        cfg = tiny_config(name, num_layers=2, vision_depth=2, fullatt_block_indexes=(1,)) if name != "tiny" \
            else tiny_config(name)
        n = param_counts(cfg)
        with torch.device("meta"):
            m = QwenVL(cfg)
        assert n.total == sum(p.numel() for p in m.parameters())
        assert n.vision == sum(p.numel() for n_, p in m.named_parameters() if n_.startswith("visual."))
        assert n.layers == sum(p.numel() for p in m.model.layers.parameters())
        assert (n.head == 0) == cfg.tie_word_embeddings
    full = param_counts(tiny_config("qwen2.5-vl-3b"))
    assert 3.7e9 < full.total < 3.8e9, "Qwen2.5-VL-3B has 3.75B parameters"
    assert 8.2e9 < param_counts(tiny_config("qwen2.5-vl-7b")).total < 8.35e9, "Qwen2.5-VL-7B has 8.29B parameters"


def test_fsdp_divides_what_it_shards():
    cfg = tiny_config("qwen2.5-vl-3b")
    base = dict(prompts_per_rank=64, group_size=8, prompt_tokens=2048, image_patches=image_patches_for(2048 ** 2),
                max_new_tokens=2048, micro_batch_rows=16, sample_chunk=8)
    one = estimate(cfg, RunPlan(**base, world_size=1))
    eight = estimate(cfg, RunPlan(**base, world_size=8, parallel="fsdp", reference="shard"))
    ddp = estimate(cfg, RunPlan(**base, world_size=8, parallel="ddp"))
    n = param_counts(cfg).total
    assert one.rows["parameters"] == 4 * n and one.rows["optimizer"] == 8 * n and one.rows["gradients"] == 4 * n
    for k in ("parameters", "gradients", "optimizer", "reference"):
        assert eight.rows[k] == pytest.approx(one.rows[k] / 8, rel=1e-6), f"FSDP must shard {k} over 8 ranks"
    assert ddp.rows["parameters"] == one.rows["parameters"] and ddp.rows["gradients"] == 2 * one.rows["gradients"]
    # what each rank samples and trains on does not shrink with sharding
    assert eight.rows["KV cache"] == one.rows["KV cache"]
    assert ddp.rows["activations (checkpointing)"] == one.rows["activations (checkpointing)"]
    # FSDP's mixed precision computes in pure bf16 (bf16 residual stream), autocast keeps the residual in fp32
    assert eight.rows["activations (checkpointing)"] < one.rows["activations (checkpointing)"]
    assert one.rows["activations (checkpointing)"] < one.rows["activations (no checkpointing)"] / 5
    assert eight.rows["rollout copy"] == 2 * n, "FSDP gathers the whole model in bf16 to sample"
    assert "| KV cache |" in eight.table()


def test_largest_sample_chunk_fits_the_budget():
    cfg = tiny_config("qwen2.5-vl-3b")
    plan = RunPlan(prompts_per_rank=64, group_size=8, prompt_tokens=2048, image_patches=4096, max_new_tokens=2048,
                   micro_batch_rows=16)
    peak = lambda c: estimate(cfg, dataclasses.replace(plan, sample_chunk=c)).rollout_peak  # noqa: E731
    for budget_gib in (60, 80, 140, 400):
        budget = budget_gib * 2**30
        k = largest_sample_chunk(cfg, plan, budget)
        assert 64 % k == 0
        assert k == 1 or peak(k) <= budget
        bigger = [c for c in range(k + 1, 65) if 64 % c == 0]
        assert not bigger or peak(bigger[0]) > budget, "a larger chunk would have fit"
    assert largest_sample_chunk(cfg, plan, 400 * 2**30) > largest_sample_chunk(cfg, plan, 80 * 2**30) > 1


def test_live_tensor_bytes_counts_allocations_not_views():
    x = torch.zeros(1000)  # made outside: never counted
    with LiveTensorBytes() as meter:
        v = x.view(10, 100).t()  # a view: no memory
        assert meter.now == 0
        y = torch.ones(2000)  # 8000 bytes
        y.add_(1)  # in place: nothing new
        assert meter.now == 8000
        del y
        assert meter.now == 0 and meter.peak == 8000
    assert v.shape == (100, 10)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    from emor3.grpo.train import main

    folder = tmp_path / "qwen2.5-vl-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config("qwen2.5-vl-7b").to_dict()))  # no weights needed
    out = tmp_path / "run"
    main(["--config", str(REPO / "examples" / "emoset_qwen2_5_vl_3b.toml"), "--model", str(folder), "--out", str(out),
          "--dry-run", "--dry-run-world", "8"])
    text = capsys.readouterr().out
    assert "8 processes, FSDP2, float32 parameters, bfloat16 compute" in text
    for row in ("parameters", "gradients", "optimizer", "reference", "rollout copy", "KV cache",
                "activations (checkpointing)", "activations (no checkpointing)", "rollout phase", "update phase"):
        assert f"| {row} |" in text or f"| **{row}** |" in text, f"--dry-run table lacks {row}"
    assert "8.29B x 4 B / 8" in text and "--grpo.sample-chunk 0 on CUDA" in text
    assert not out.exists(), "--dry-run must not build or write anything"


def test_lora_plan_trains_only_the_adapters():
    from emor3.memory import lora_param_count
    from emor3.models.lora import DECODER_TARGETS

    cfg = tiny_config("qwen2.5-vl-3b")
    base = dict(prompts_per_rank=8, group_size=8, prompt_tokens=1024, image_patches=2048, max_new_tokens=1024,
                micro_batch_rows=8, param_dtype="bfloat16", compute_dtype="bfloat16", reference="replicate")
    full = estimate(cfg, RunPlan(**base))
    lora = estimate(cfg, RunPlan(**base, lora_rank=64, lora_targets=tuple(DECODER_TARGETS)))
    n = lora_param_count(cfg, 64, DECODER_TARGETS)
    assert 119e6 < n < 121e6, "rank 64 on the 3B decoder's linear layers: 119.7M adapter parameters"
    assert lora.rows["gradients"] == 4 * n and lora.rows["optimizer"] == 8 * n, "adapters train in fp32"
    assert lora.rows["reference"] == 0, "LoRA's reference is the base with adapters off: no copy"
    assert lora.rows["parameters"] == full.rows["parameters"] + 4 * n
    assert lora.update_peak < full.update_peak - full.rows["optimizer"]
    init = estimate(cfg, RunPlan(**base, lora_rank=64, lora_targets=tuple(DECODER_TARGETS), init_reference=True))
    assert init.rows["reference"] == full.rows["reference"] > 0, \
        "--grpo.reference init keeps the pre-SFT model as its own frozen copy, also with LoRA"
