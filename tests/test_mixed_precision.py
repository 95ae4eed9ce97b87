"""fp32 master weights with bf16 compute: at the paper's learning rate (2e-6) a run with the EmoSet recipe's
precision settings moves essentially every weight, as an fp32 run does.

A bf16 parameter cannot take an AdamW step of ~lr = 2e-6 on a weight of size ~0.02: bf16's rounding step there is
~1e-4, so the update rounds away and the weight never moves. The recipe therefore keeps the trained parameters and
AdamW's moments in fp32 (``[model] dtype``) and computes in bf16 (``[run] mixed_precision``: autocast on one
process, FSDP2's MixedPrecisionPolicy under torchrun). The test runs two GRPO steps of the tiny model twice, once in
plain fp32 and once with the recipe's two settings, and checks: the same share of weights moved (bf16 parameters
move ~0 % here), the compute really was bf16 (a decoder projection's outputs), the checkpoint and the optimizer
state are fp32.
"""

from pathlib import Path

import pytest
import torch

from emor3.config import config_from_dict, load_toml
from emor3.checkpoints import latest_checkpoint
from emor3.grpo.train import train
from emor3.models import load_pretrained
from emor3.models.checkpoint import load_torch_state
from emor3.models.qwen_vl import Attention

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "emoset_qwen2_5_vl_3b.toml"

PLUGIN = '''
def length_reward(prompts, completions, **kw):
    """Varies within every group, so every parameter gets a gradient."""
    return [len(c) / 100.0 for c in completions]
'''


def tiny_run(tmp_path: Path, name: str, dtype: str, mixed_precision: str, plugin: str):
    d = {
        "model": {"dtype": dtype},
        "data": {"emoscenes_train": 16, "emoscenes_test": 2, "emoscenes_ood": 1, "cold_start": 4,
                 "cache_dir": str(tmp_path / "emoscenes")},
        "sft": {"steps": 0, "instruct_steps": 0},
        "grpo": {"steps": 2, "prompts_per_step": 2, "mini_batch_prompts": 2, "group_size": 2, "micro_batch_rows": 4,
                 "max_new_tokens": 12, "lr": 2e-6, "weight_decay": 0.01},
        "reward": {"judge_max_new_tokens": 2, "plugins": [plugin]},
        "eval": {"max_new_tokens": 4, "batch_size": 8},
        "run": {"out": str(tmp_path / name), "progress": False, "mixed_precision": mixed_precision},
    }
    return config_from_dict(d)


def moved_fraction(out: Path) -> float:
    before = load_pretrained(out / "init").state_dict()
    after = load_pretrained(latest_checkpoint(out) / "model").state_dict()
    moved = sum(int((before[k].to(after[k].dtype) != after[k]).sum()) for k in before)  # compared as trained
    return moved / sum(v.numel() for v in before.values())


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "emor3_mp_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "emor3_mp_plugin:length_reward=1.0"


def test_recipe_precision_moves_every_weight_at_lr_2e6(tmp_path, plugin, monkeypatch):
    recipe = load_toml(RECIPE)
    dtype, mp = recipe["model"]["dtype"], recipe["run"]["mixed_precision"]
    assert mp == "bf16", "the recipe asks for bf16 compute explicitly"

    seen = set()  # dtypes of the decoder's query projections' outputs during the recipe-precision run
    q_projs = set()

    def record(mod, args, out):
        if isinstance(mod, Attention):
            q_projs.add(id(mod.q_proj))
        elif id(mod) in q_projs:
            seen.add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        train(tiny_run(tmp_path, "recipe", dtype, mp, plugin))
    finally:
        handle.remove()
    train(tiny_run(tmp_path, "fp32", "float32", "fp32", plugin))

    ref, mixed = moved_fraction(tmp_path / "fp32"), moved_fraction(tmp_path / "recipe")
    assert ref > 0.9, f"the fp32 run moved only {ref:.1%} of the weights"
    assert mixed > 0.98 * ref, (f"with the recipe's precision ({dtype} parameters, {mp} compute) only {mixed:.2%} of "
                                f"the weights moved at lr 2e-6, against {ref:.2%} in fp32: updates round away")
    assert torch.bfloat16 in seen, f"the recipe's run did not compute in bf16 (q_proj outputs {seen})"
    params = load_pretrained(latest_checkpoint(tmp_path / "recipe") / "model").state_dict()
    assert {v.dtype for v in params.values()} == {torch.float32}, "the trained copy must be the fp32 master"
    state = load_torch_state(latest_checkpoint(tmp_path / "recipe") / "trainer_state.pt")
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0]
    assert moments and {t.dtype for t in moments} == {torch.float32}, "AdamW's moments must be fp32"
