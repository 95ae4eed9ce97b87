"""Several updates per rollout batch (μ > 1), inside the real step, against a hand computation on the tiny model.

The recipe's mini_batch_prompts = 256 of 512 makes two updates per rollout batch; here 4 prompts per step,
mini-batches of 2 prompts, 2 epochs: four AdamW updates per batch, each mini-batch split into micro-batches of one
prompt. ``grpo_step`` runs on a real collected batch (its ``collect`` is wrapped only to keep a copy); the hand
computation starts from a copy of the model taken before the step and does, in plain code:
  - old log-probs: the policy's teacher-forced log-probs before the first update (not the sampler's);
  - the per-update shuffle: epoch e takes its mini-batches from randperm(B) seeded with seed + 131·step + e;
  - the clipped surrogate written out (ratio = exp(logp − old), max(−A·r, −A·clip(r, 1 − 0.2, 1 + 0.3)), capped
    at −3·A for A < 0), token-mean over the mini-batch, accumulated over its micro-batches; grad clip 1, AdamW.
Checked: the parameters after the step equal the hand ones; the ratio is exactly 1 in the first update and not
afterwards; at this learning rate clipping really triggers (clip fractions > 0), with the same fractions the
hand computation counts.
"""

import copy

import pytest
import torch

import emor3.grpo.step as step_module
from emor3 import distributed as dist
from emor3.config import config_from_dict
from emor3.engine.sampler import group_rows
from emor3.engine.scoring import completion_logprobs, prompt_slice
from emor3.stages.build import build
from emor3.stages.grpo import rollout_setup
from emor3.toy.world import WORLD
from emor3.grpo.rollout import PromptStream
from emor3.grpo.step import grpo_step

PLUGIN = '''
def length_reward(prompts, completions, **kw):
    """Varies within every group, so every group has non-zero advantages."""
    return [len(c) / 10.0 for c in completions]
'''

B, G, MINI, EPOCHS, LR, SEED = 4, 2, 2, 2, 3e-2, 0


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "emor3_mu_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "emor3_mu_plugin:length_reward=1.0"


def surrogate(logp, old, adv, mask):
    """The paper's clipped surrogate, written out: clip 0.2 / 0.3, dual clip 3 -> per-token loss, clip counts."""
    A = adv[:, None].expand_as(logp)
    r = torch.exp(logp - old)
    loss = torch.maximum(-A * r, -A * r.clamp(0.8, 1.3))
    loss = torch.where(A < 0, torch.minimum(loss, -3.0 * A), loss)
    n, r = mask.sum(), r.detach()
    return loss, {"clip_frac_low": float((((A < 0) & (r < 0.8)) * mask).sum() / n),
                  "clip_frac_high": float((((A > 0) & (r > 1.3)) * mask).sum() / n),
                  "ratio_min": float(r[mask > 0].min()), "ratio_max": float(r[mask > 0].max())}


def test_two_epochs_of_two_mini_batches_match_a_hand_computation(tmp_path, plugin, monkeypatch):
    cfg = config_from_dict({
        "data": {"emoscenes_train": 16, "emoscenes_test": 2, "emoscenes_ood": 1, "cold_start": 2,
                 "cache_dir": str(tmp_path / "emoscenes")},
        "sft": {"steps": 0, "instruct_steps": 0},
        "grpo": {"algo": "grpo", "kl_coef": 0.0, "prompts_per_step": B, "mini_batch_prompts": MINI, "epochs": EPOCHS,
                 "group_size": G, "micro_batch_rows": G, "max_new_tokens": 8, "lr": LR, "weight_decay": 0.01},
        "reward": {"plugins": [plugin]},
        "run": {"out": str(tmp_path / "run"), "progress": False, "seed": SEED},
    }).resolved()
    run = build(cfg, tmp_path / "run", WORLD)
    policy = dist.wrap_policy(run.model, cfg.run.parallel, run.device, cfg.run.mixed_precision)
    optimizer = torch.optim.AdamW(run.model.parameters(), lr=LR, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    hand = copy.deepcopy(run.model)  # the policy before the step
    kept = {}

    real_collect = step_module.collect

    def collect_and_keep(*args):  # the real collect; the test keeps its batch
        out = real_collect(*args)
        kept["batch"] = out[0]
        return out

    monkeypatch.setattr(step_module, "collect", collect_and_keep)
    m, _ = grpo_step(cfg, rollout_setup(cfg, run, run.model, None), PromptStream(len(run.train_set), SEED), policy,
                     None, optimizer, scheduler, step=0)
    batch = kept["batch"]
    assert batch.advantages.abs().sum() > 0, "no advantage: the step would learn nothing"

    # ---- the same step by hand ------------------------------------------------------------------------------
    T = int(batch.rollout.completion_mask.sum(1).max())
    ids, mask = batch.rollout.completion_ids[:, :T], batch.rollout.completion_mask[:, :T]  # (N, T)

    def logprobs(model, prompts, **kw):
        rows = group_rows(prompts, G)
        return completion_logprobs(model, prompt_slice(batch.prompts, prompts),
                                   torch.arange(len(prompts)).repeat_interleave(G), ids[rows], mask[rows],
                                   shared_prefix=cfg.grpo.shared_prefix, **kw)  # the loop's own teacher forcing

    hand.eval()
    with torch.no_grad():  # old log-probs: the policy before any update, recomputed by teacher forcing
        old = torch.cat([logprobs(hand, torch.tensor([b])) for b in range(B)])  # (N, T)
    opt = torch.optim.AdamW(hand.parameters(), lr=LR, weight_decay=0.01)
    hand.train()
    ratios, clips, shuffled = [], {"clip_frac_low": [], "clip_frac_high": []}, False
    for epoch in range(EPOCHS):
        order = torch.randperm(B, generator=torch.Generator().manual_seed(SEED + 131 * 0 + epoch))
        shuffled |= not torch.equal(order[:MINI].sort().values, torch.arange(MINI))
        for start in range(0, B, MINI):
            mb = order[start:start + MINI].sort().values
            n_tokens = mask[group_rows(mb, G)].sum()  # token-mean over the whole mini-batch
            opt.zero_grad(set_to_none=True)
            update_ratios = []
            for p in mb:  # one prompt per micro-batch, as micro_batch_rows = G
                rows = group_rows(p[None], G)
                lp, _ = logprobs(hand, p[None], return_entropy=True)
                loss, stats = surrogate(lp, old[rows], batch.advantages[rows], mask[rows])
                ((loss * mask[rows]).sum() / n_tokens).backward()
                update_ratios += [stats["ratio_min"], stats["ratio_max"]]
                for k in clips:
                    clips[k].append(stats[k])
            torch.nn.utils.clip_grad_norm_(list(hand.parameters()), 1.0)
            opt.step()
            ratios.append(update_ratios)

    assert shuffled, "the seeded permutations happen to be the identity: the shuffle is not exercised"
    assert all(abs(r - 1) < 1e-5 for r in ratios[0]), "first update: the policy has not moved, ratio must be 1"
    assert all(max(abs(r - 1) for r in u) > 1e-3 for u in ratios[1:]), "later updates: the ratio must move off 1"
    assert m["clip_frac_low"] + m["clip_frac_high"] > 0, "clipping never triggered: raise the learning rate"
    for k in clips:
        assert m[k] == pytest.approx(sum(clips[k]) / len(clips[k]), abs=1e-6), f"{k}: loop vs hand"
    assert m["ratio_max"] == pytest.approx(max(max(u) for u in ratios), rel=1e-4)
    after = dict(run.model.named_parameters())
    worst = max(float((after[n] - p).abs().max()) for n, p in hand.named_parameters())
    assert worst < 1e-5, f"parameters after μ = {EPOCHS} epochs x {B // MINI} mini-batches differ from the hand " \
                         f"computation by {worst:.2e}"
