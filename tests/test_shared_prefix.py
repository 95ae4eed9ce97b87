"""Shared-prefix teacher forcing equals the unshared computation (fp32, CPU).

Reference: ``emor3.engine.scoring.completion_logprobs``, which builds the N unshared (N, P + T) sequences
(``teacher_forcing_inputs``), copies each prompt's image features to its rows and runs ``QwenVL.logprobs``. The
shared path must give the same log-probs, entropies and parameter gradients (vision tower included), on a mixed
batch (left padding, prompts of different lengths, a text-only prompt, a prompt with two images) with completions
of different lengths, with and without gradient checkpointing, and at temperature != 1.
"""

import pytest
import torch

from emor3.engine.scoring import completion_logprobs
from emor3.models import QwenVL, QwenVLConfig
from emor3.models.positions import mrope_position_ids
from emor3.models.processing import PromptBatch
from emor3.models.qwen3_vl import Qwen3VL
from emor3.models.shared_prefix import shared_prefix_logprobs
from emor3.models.sizes import tiny_config
from test_models_parity import IMG, mixed_batch, tiny_hf_config

G = 3


def parity_model(model_type: str) -> QwenVL:
    cfg = QwenVLConfig.from_dict(tiny_hf_config(model_type, tie=model_type == "qwen2_vl").to_dict())
    torch.manual_seed(0)
    return QwenVL(cfg).init_weights(0, std=0.1)


def prompt_batch(image_token_id: int = IMG, vocab: int | None = None) -> PromptBatch:
    ids, am, grids, pix = mixed_batch()
    if image_token_id != IMG:  # the named tiny model: the same layout with its own special ids
        ids = torch.where(ids == IMG, image_token_id, ids)
    pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=image_token_id, spatial_merge_size=2)
    return PromptBatch(ids, am, pos, pix, grids, nxt, num_images=[1, 0, 2])


def completions(B: int, T: int, vocab: int, seed: int = 3):
    """N = B·G completions, row n of prompt n // G, lengths 1..T (a stop mid-way, one row of a single token)."""
    g = torch.Generator().manual_seed(seed)
    N = B * G
    ids = torch.randint(0, min(vocab, 80), (N, T), generator=g)  # (N, T) ordinary tokens
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # (N, T)
    return torch.arange(B).repeat_interleave(G), ids * mask.long(), mask


def run(model, batch, index, ids, mask, shared: bool, temperature: float):
    model.zero_grad(set_to_none=True)
    fn = shared_prefix_logprobs if shared else completion_logprobs
    lp, ent = fn(model, batch, index, ids, mask, temperature=temperature, return_entropy=True)
    # a loss touching every scored token with different weights, as a policy loss does
    w = torch.linspace(-1.0, 2.0, lp.numel()).view_as(lp)
    ((lp * w + 0.3 * ent) * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), grads


def assert_same(a, b):
    lp_a, ent_a, g_a = a
    lp_b, ent_b, g_b = b
    assert (lp_a - lp_b).abs().max() <= 1e-5, f"log-probs differ by {(lp_a - lp_b).abs().max():.2e}"
    assert (ent_a - ent_b).abs().max() <= 1e-5, f"entropies differ by {(ent_a - ent_b).abs().max():.2e}"
    assert set(g_a) == set(g_b), f"gradients reach different parameters: {set(g_a) ^ set(g_b)}"
    assert any(n.startswith("visual.") for n in g_a), "the vision tower got no gradient"
    for n in g_a:
        rel = (g_a[n] - g_b[n]).abs().max() / g_b[n].abs().max().clamp(min=1e-12)
        assert rel <= 1e-5, f"{n}: gradients differ by {rel:.2e} relative (a prompt's gradient lost or doubled?)"


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_shared_prefix_equals_unshared_mixed_batch(model_type, ckpt):
    model = parity_model(model_type).train().set_gradient_checkpointing(ckpt)
    batch = prompt_batch()
    index, ids, mask = completions(batch.batch_size, T=7, vocab=model.config.text.vocab_size)
    temperature = 0.7 if ckpt else 1.0
    assert_same(run(model, batch, index, ids, mask, True, temperature),
                run(model, batch, index, ids, mask, False, temperature))


def test_shared_prefix_equals_unshared_named_tiny_model():
    """The named "tiny" model (the default run's size), prompts in an order that is not 0, 0, 1, 1, ...:
    row n may continue any prompt."""
    cfg = tiny_config("tiny")
    torch.manual_seed(0)
    model = QwenVL(cfg).init_weights(0, std=0.05).train()
    batch = prompt_batch(cfg.image_token_id)
    index, ids, mask = completions(batch.batch_size, T=12, vocab=cfg.text.vocab_size, seed=5)
    index = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(0))]
    assert_same(run(model, batch, index, ids, mask, True, 1.0), run(model, batch, index, ids, mask, False, 1.0))


def test_shared_prefix_single_token_and_no_grad():
    """T = 1 (only the prompt's last position is read) and the no-grad path the reference model takes."""
    model = parity_model("qwen2_5_vl").eval()
    batch = prompt_batch()
    index, ids, mask = completions(batch.batch_size, T=1, vocab=model.config.text.vocab_size)
    with torch.no_grad():
        a = shared_prefix_logprobs(model, batch, index, ids, mask)
        b = completion_logprobs(model, batch, index, ids, mask)
    assert a.shape == (len(index), 1) and (a - b).abs().max() <= 1e-5


def test_right_padded_prompts_are_rejected():
    model = parity_model("qwen2_5_vl").eval()
    batch = prompt_batch()
    batch.attention_mask = batch.attention_mask.flip(1)
    index, ids, mask = completions(batch.batch_size, T=2, vocab=model.config.text.vocab_size)
    with pytest.raises(ValueError, match="left-padded"):
        shared_prefix_logprobs(model, batch, index, ids, mask)



@pytest.mark.parametrize("ckpt", [False, True])
def test_shared_prefix_equals_unshared_qwen3_vl(ckpt):
    """Qwen3-VL: interleaved M-RoPE, per-head q/k norm, and DeepStack features added to the prompt stream at its
    image tokens after the first decoder layers (images of three sizes, 16-px patches)."""
    from test_qwen3_vl import mixed_batch as qwen3_mixed_batch, tiny_hf_config as qwen3_hf_config

    from emor3.models import parse_config

    torch.manual_seed(0)
    model = Qwen3VL(parse_config(qwen3_hf_config(tie=ckpt).to_dict())).init_weights(0, std=0.1)
    model.train().set_gradient_checkpointing(ckpt)
    ids, am, grids, pix = qwen3_mixed_batch()
    pos, nxt = mrope_position_ids(ids, am, grids, image_token_id=IMG, spatial_merge_size=2)
    batch = PromptBatch(ids, am, pos, pix, grids, nxt, num_images=[1, 0, 2])
    index, ids_c, mask = completions(batch.batch_size, T=6, vocab=model.config.text.vocab_size)
    shared, plain = (run(model, batch, index, ids_c, mask, s, 0.7) for s in (True, False))
    assert_same(shared, plain)
    assert all(n in shared[2] for n, _ in model.visual.deepstack_merger_list.named_parameters(prefix="visual."
                                                                                               "deepstack_merger_list"))


def test_other_model_types_are_refused():
    """A decoder the shared loop does not know is refused, never guessed at."""
    model = parity_model("qwen2_5_vl").eval()
    model.config = model.config.replace()
    object.__setattr__(model.config, "model_type", "llava")
    batch = prompt_batch()
    index, ids, mask = completions(batch.batch_size, T=2, vocab=model.config.text.vocab_size)
    with pytest.raises(ValueError, match="score this model unshared"):
        shared_prefix_logprobs(model, batch, index, ids, mask)
