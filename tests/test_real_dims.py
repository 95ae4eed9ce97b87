"""The published Qwen2.5-VL-3B and 7B shapes, cut to 2 decoder layers and 2 vision blocks, against transformers.

Everything but depth is the released model's: text width, MLP width, heads, kv heads and head dim, the 151k
vocabulary (tied head for 3B, untied for 7B), M-RoPE sections, the 1280-wide vision tower with its 112-px windows
(block 0 windowed, block 1 full attention) and the merger. Random weights at transformers' init scale, fp32, CPU.
The images span several windows, edge windows included, so window attention is exercised at the real window size.

Checked: logits on a left-padded batch (one image row, one text-only row, one two-image row) and the chunked
teacher-forced log-probs, each within 1e-4 of transformers (relative to the logit scale). Then one GRPO step at the
3B width as the recipe runs it (fp32 parameters and AdamW, bf16 autocast, gradient checkpointing, chunked
log-probs): sampling, the clipped surrogate, two updates; the update's peak memory, measured on this CPU
(10.4 GiB), within 25 % of the memory plan (9.1 GiB).

These models hold 0.55B (3B) and 1.6B (7B) parameters even at this depth (the 151k x width embeddings dominate);
transformers' copy shares our tensors, so the weights exist once. The three tests take about 8 minutes and 13 GB
peak on one CPU thread, so they run with `make check-real` (the `real` marker), not in `make test`.
"""

import pytest
import torch
import transformers

from emor3.models import QwenVL, QwenVLConfig, mrope_position_ids, tiny_config
from test_models_parity import hf_key, left_pad

pytestmark = pytest.mark.real

SIZES = ["qwen2.5-vl-3b", "qwen2.5-vl-7b"]


def real_config(name: str) -> QwenVLConfig:
    # the published numbers with 2 layers / 2 blocks; block 1 keeps full attention as blocks 7, 15, 23, 31 do
    return tiny_config(name, num_layers=2, vision_depth=2, fullatt_block_indexes=(1,))


def make_pair(cfg: QwenVLConfig, seed: int = 0):
    """Ours at random init and transformers' model holding the very same tensors (built on the meta device and
    given our parameters by assignment, so the weights exist once; only the rotary buffers are its own)."""
    hfc = transformers.Qwen2_5_VLConfig.from_dict(cfg.to_dict())
    t = hfc.text_config
    assert t.vocab_size == cfg.text.vocab_size > 150_000 and hfc.vision_config.window_size == 112
    assert t.hidden_size // t.num_attention_heads == cfg.text.head_dim == 128
    ours = QwenVL(cfg).init_weights(seed).eval()
    with torch.device("meta"):
        hf = transformers.Qwen2_5_VLForConditionalGeneration(hfc)
    sd = {hf_key(k): v for k, v in ours.state_dict().items()}
    tie = cfg.tie_word_embeddings
    if tie:
        sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True, assign=True)
    hf.model.visual.rotary_pos_emb = type(hf.model.visual.rotary_pos_emb)(hfc.vision_config)
    hf.model.language_model.rotary_emb = type(hf.model.language_model.rotary_emb)(config=t)
    on_meta = [n for n, x in [*hf.named_parameters(), *hf.named_buffers()] if x.is_meta]
    assert not on_meta, f"transformers' model still has tensors without values: {on_meta}"
    return ours, hf.eval()


def real_batch(cfg: QwenVLConfig):
    """Rows: [img 12x16 patches] text; text only (left-padded most); [img 8x8] text [img 4x12] text.

    At the real 112-px window (4x4 merged tokens) the 12x16-patch image is 6x8 merged tokens in 2x2 windows, the
    lower two only 2 tokens tall; the 4x12-patch one is 2x6 tokens: a 2x4 and an edge 2x2 window."""
    IMG, VS, VE = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    grids = torch.tensor([[1, 12, 16], [1, 8, 8], [1, 4, 12]])  # merged tokens 48, 16, 12
    g = torch.Generator().manual_seed(1)

    def text(k):
        return torch.randint(0, 150_000, (k,), generator=g).tolist()

    def img(k):
        return [VS] + [IMG] * k + [VE]

    rows = [text(3) + img(48) + text(6), text(5), text(2) + img(16) + text(2) + img(12) + text(4)]
    ids, am = left_pad(rows)
    pix = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)  # (patches, C*t*p*p)
    return ids, am, grids, pix


@pytest.mark.parametrize("name", SIZES)
def test_real_width_logits_and_logprobs_match_transformers(name):
    torch.manual_seed(0)
    cfg = real_config(name)
    ours, hf = make_pair(cfg)
    ids, am, grids, pix = real_batch(cfg)
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=cfg.image_token_id)
    T = 4  # the last 4 tokens of every row are the "completion"
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am, position_ids=pos, pixel_values=pix, image_grid_thw=grids).logits
        emb = ours.encode_images(pix, grids)
        out = ours.logits(ours(ids, pos, am, image_embeds=emb))
        assert out.shape == ref.shape == (3, ids.shape[1], cfg.text.vocab_size)
        valid = am.bool()
        scale = ref[valid].abs().max().clamp(min=1)
        err = (ref - out)[valid].abs().max() / scale
        assert err < 1e-4, f"{name}: logits differ from transformers by {err:.2e} (relative to {scale:.2f})"
        lp = ours.logprobs(ids, pos, am, T, image_embeds=emb, chunk_size=5)  # (3, T), chunks cross rows
        ref_lp = torch.log_softmax(ref.float(), -1)[:, -T - 1:-1].gather(-1, ids[:, -T:, None]).squeeze(-1)
        lp_err = (lp - ref_lp).abs().max()
        assert lp_err < 1e-4, f"{name}: chunked log-probs differ from transformers' by {lp_err:.2e}"


def test_one_grpo_step_at_3b_width_bf16_compute_with_checkpointing():
    """One GRPO step of the 3B-width model (2 layers / 2 blocks) as the recipe runs it: fp32 parameters and AdamW,
    bf16 autocast (PolicyScorer), gradient checkpointing, chunked log-probs; sampling, the clipped surrogate, the
    update. Measured: the peak live tensor bytes of the update against the memory plan. Printed with -s."""
    from emor3.distributed import PolicyScorer
    from emor3.engine.sampler import sample
    from emor3.grpo.objective import aggregate, policy_loss
    from emor3.memory import GiB, RunPlan, estimate, measure_peak, storage_bytes

    torch.manual_seed(0)
    cfg = real_config("qwen2.5-vl-3b")
    model = QwenVL(cfg).init_weights(0).set_gradient_checkpointing(True)
    ids, am, grids, pix = real_batch(cfg)
    keep = torch.tensor([0, 2])  # the two image rows, as a prompt batch
    ids, am = ids[keep], am[keep]
    from emor3.models import PromptBatch

    pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=cfg.image_token_id)
    batch = PromptBatch(ids, am, pos, pix, grids, nxt, [1, 2])
    G, T = 2, 8
    scorer = PolicyScorer(model, torch.bfloat16)
    model.eval()
    r = scorer.run(sample, model, batch, group_size=G, max_new_tokens=T, generator=0)  # under autocast
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-6, weight_decay=0.01)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])  # (N,)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def update():
        lp = scorer(batch, r.prompt_index, r.completion_ids, r.completion_mask)  # (N, T)
        per_tok, _ = policy_loss(lp, r.logprobs, adv, r.completion_mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
        loss = aggregate(per_tok, r.completion_mask, mode="token-mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    with measure_peak(torch.device("cpu")) as first:
        loss = update()  # AdamW's moments are created in this one
    held = storage_bytes(model.parameters(), [s for st in opt.state.values() for s in st.values()])
    with measure_peak(torch.device("cpu")) as second:
        update()
    measured = held + second["peak"]
    plan = RunPlan(prompts_per_rank=2, group_size=G, prompt_tokens=ids.shape[1], image_patches=int(grids[:2].prod(-1).sum()),
                   max_new_tokens=T, micro_batch_rows=4, param_dtype="float32", compute_dtype="bfloat16",
                   reference=None, gradient_checkpointing=True)
    planned = estimate(cfg, plan).update_peak
    print(f"\n3B width, 2 layers: GRPO update peak {measured / GiB:.2f} GiB measured (first step, moments "
          f"created: {first['peak'] / GiB:.2f} GiB above the parameters), {planned / GiB:.2f} GiB planned")
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moved = sum(int((before[n] != p.detach()).sum()) for n, p in model.named_parameters())
    assert moved / sum(p.numel() for p in model.parameters()) > 0.5, "fp32 master weights must move at lr 2e-6"
    assert abs(planned / measured - 1) < 0.25, f"plan {planned / GiB:.2f} GiB vs measured {measured / GiB:.2f} GiB"
