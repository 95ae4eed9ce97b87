"""LoRA (emor3.models.lora) against PEFT on transformers' Qwen2-VL / Qwen2.5-VL holding the same weights.

Covered: PEFT loads our adapter folder and gives our logits; our loader reads a folder PEFT wrote; gradients reach
only the adapters and an optimizer step changes nothing else; adapters switched off give the base logits exactly;
save / load round trip; `python -m emor3.models merge` writes a folder transformers loads with the same logits.
"""

import dataclasses
import json
import os
from pathlib import Path

import peft  # the test extra: PEFT is the reference, never a runtime dependency
import pytest
import torch
import transformers
from safetensors import safe_open

from emor3.config import parse_args
from emor3.checkpoints import latest_checkpoint, load_policy
from emor3.grpo.train import train
from emor3.models import load_pretrained, save_pretrained
from emor3.models.__main__ import main as models_main
from emor3.models.lora import (DECODER_TARGETS, LoRALinear, adapter_parameters, adapters_disabled, add_lora,
                               load_adapter, lora_modules, merge_adapters, save_adapter)
from emor3.models.positions import mrope_position_ids
import test_distributed as dist_tests
import test_qwen3_vl as q3
from test_distributed import plugin_dir  # noqa: F401  (the fixture)
from test_models_parity import CASES, IMG, make_pair, mixed_batch
from test_train import plugin, tiny_config  # noqa: F401  (plugin: the fixture)


ALL = DECODER_TARGETS + ("vision", "merger")


def inputs():
    ids, am, grids, pix = mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=IMG)
    return ids, am, grids, pix, pos


def our_logits(model):
    ids, am, grids, pix, pos = inputs()
    with torch.no_grad():
        return model.logits(model(ids, pos, am, image_embeds=model.encode_images(pix, grids))), am.bool()


def hf_logits(model):
    ids, am, grids, pix, pos = inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am, position_ids=pos, pixel_values=pix,
                     image_grid_thw=grids).logits


def randomize_b(model, seed=5, std=0.2):
    # fresh adapters have B = 0 (no change to the model); random B makes every adapter change the logits
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


@pytest.mark.parametrize("model_type,tie", CASES)
def test_peft_loads_our_adapter_with_our_logits(tmp_path, model_type, tie):
    ours, hf = make_pair(model_type, tie)
    base, valid = our_logits(ours)
    names = add_lora(ours, rank=4, alpha=8, targets=ALL, seed=1)
    randomize_b(ours)
    lora, _ = our_logits(ours)
    assert (lora - base)[valid].abs().max() > 1e-2, "the adapters do not change the logits: the test would be empty"
    save_adapter(ours, tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight" in keys
    assert len(keys) == 2 * len(names)

    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    ours_hf = {("model.language_model." + n[6:]) if n.startswith("model.") else "model." + n for n in names}
    assert wrapped == ours_hf, "PEFT put adapters on other layers than ours (target_modules regex)"
    ref = hf_logits(pm)
    err = (ref - lora)[valid].abs().max().item()
    print(f"PEFT vs emor3 LoRA logits ({model_type}): max abs diff {err:.2e}, scale {ref[valid].abs().max():.2f}")
    assert err <= 1e-4, f"PEFT on transformers gives other logits than our LoRA model ({err:.2e})"
    with pm.disable_adapter(), adapters_disabled(ours):  # both sides agree with the adapters off too
        assert (hf_logits(pm) - our_logits(ours)[0])[valid].abs().max() <= 1e-4


def test_our_loader_reads_a_peft_folder(tmp_path):
    ours, hf = make_pair("qwen2_5_vl", False)
    # suffix targets as most PEFT users write them: they also hit the vision blocks' mlp projections
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / "peft")
    got = load_adapter(ours, tmp_path / "peft")
    assert "visual.blocks.0.mlp.down_proj" in got and "model.layers.1.self_attn.v_proj" in got
    ref = hf_logits(pm.eval())
    lora, valid = our_logits(ours)
    assert (ref - lora)[valid].abs().max() <= 1e-4, "a PEFT-written adapter (rsLoRA) loads with other logits"


def test_gradients_reach_only_the_adapters():
    ours, _ = make_pair("qwen2_5_vl", False)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    add_lora(ours, rank=2, alpha=4, targets=DECODER_TARGETS, dropout=0.1, seed=0)
    randomize_b(ours)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(ours)}, "base weights are trainable"
    ours.train()
    ids, am, grids, pix, pos = inputs()
    lp = ours.logprobs(ids, pos, am, 4, image_embeds=ours.encode_images(pix, grids))
    lp.sum().backward()
    for name, p in ours.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"adapter {name} gets no gradient"
        else:
            assert p.grad is None, f"base parameter {name} gets a gradient"
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    opt.step()
    after = ours.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"an optimizer step over the trainable parameters changed base {k}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disabled_adapters_give_the_base_logits_exactly(dtype):
    ours, _ = make_pair("qwen2_5_vl", False)
    ours.to(dtype)
    base, valid = our_logits(ours)
    add_lora(ours, rank=4, alpha=16, targets=ALL, seed=2)
    fresh, _ = our_logits(ours)
    assert torch.equal(fresh, base), "fresh adapters (B = 0) must leave the model unchanged"
    randomize_b(ours)
    on, _ = our_logits(ours)
    assert not torch.equal(on, base)
    with adapters_disabled(ours):
        off, _ = our_logits(ours)
    assert torch.equal(off, base), "adapters off must be the base model exactly (the KL reference)"
    again, _ = our_logits(ours)
    assert torch.equal(again, on), "leaving adapters_disabled must switch the adapters back on"


def test_save_load_round_trip_and_errors(tmp_path):
    ours, _ = make_pair("qwen2_5_vl", False)
    add_lora(ours, rank=4, alpha=8, targets=("q_proj", "o_proj", "merger"), seed=3)
    randomize_b(ours)
    want, _ = our_logits(ours)
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="/models/base")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    umask = os.umask(0o022)
    os.umask(umask)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / f).stat().st_mode & 0o777 == 0o666 & ~umask, f"{f} has not the user's file mode"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == ("LORA", 4, 8, "/models/base")

    fresh, _ = make_pair("qwen2_5_vl", False)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(our_logits(fresh)[0], want)
    assert all(isinstance(m, LoRALinear) for m in lora_modules(fresh).values()) and len(lora_modules(fresh)) == 2 * 2 + 2
    # onto a model that already has the same adapters (resume): weights are replaced, nothing is added
    again, _ = make_pair("qwen2_5_vl", False)
    add_lora(again, rank=4, alpha=8, targets=("q_proj", "o_proj", "merger"), seed=9)
    load_adapter(again, tmp_path / "a")
    assert torch.equal(our_logits(again)[0], want)

    other, _ = make_pair("qwen2_5_vl", False)
    add_lora(other, rank=2, alpha=8, targets=("q_proj",), seed=0)
    with pytest.raises(ValueError, match="r=2"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(ValueError, match="valid names"):
        add_lora(make_pair("qwen2_5_vl", False)[0], rank=2, alpha=2, targets="q_proj,qkv_proj")
    cfg["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(make_pair("qwen2_5_vl", False)[0], tmp_path / "a")


def test_merge_command_writes_a_folder_transformers_loads(tmp_path):
    ours, _ = make_pair("qwen2_5_vl", False)
    save_pretrained(ours, tmp_path / "base")
    add_lora(ours, rank=4, alpha=8, targets=ALL, seed=4)
    randomize_b(ours)
    want, valid = our_logits(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    models_main(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "m")])
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert (hf_logits(hf) - want)[valid].abs().max() <= 1e-4, "merged folder loads in transformers with other logits"
    merged = load_pretrained(tmp_path / "m")
    assert not lora_modules(merged)
    assert (our_logits(merged)[0] - want)[valid].abs().max() <= 1e-4
    # in-memory merge puts plain nn.Linear back with the same parameters' storage
    w = ours.model.layers[0].self_attn.q_proj.weight
    merge_adapters(ours)
    assert type(ours.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert ours.model.layers[0].self_attn.q_proj.weight is w
    with pytest.raises(SystemExit):
        models_main(["merge", str(tmp_path / "base"), "--out", str(tmp_path / "x")])  # not an adapter folder


def test_qwen3_vl_adapter_loads_in_peft_with_our_logits(tmp_path):
    ours, hf = q3.make_pair()
    ids, am, grids, pix = q3.mixed_batch()
    pos, _ = mrope_position_ids(ids, am, grids, image_token_id=q3.IMG)
    names = add_lora(ours, rank=4, alpha=8, targets=ALL, seed=6)
    assert any(n.startswith("visual.deepstack_merger_list.") for n in names), "merger must cover DeepStack mergers"
    randomize_b(ours)
    save_adapter(ours, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = q3.hf_logits(pm, ids, am, grids, pix, pos)
        out = ours.logits(ours(ids, pos, am, image_embeds=ours.encode_images(pix, grids)))
    err = (ref - out)[am.bool()].abs().max().item()
    print(f"PEFT vs emor3 LoRA logits (qwen3_vl): max abs diff {err:.2e}")
    assert err <= 1e-4, f"PEFT on Qwen3VLForConditionalGeneration gives other logits ({err:.2e})"


def test_lora_grpo_run_trains_only_adapters_and_resumes_exactly(tmp_path, plugin):
    lora = {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": list(ALL)}
    full = tiny_config(tmp_path / "a", model=lora, reward={"plugins": [plugin]}, grpo={"steps": 2})
    train(full)
    out = Path(full.run.out)
    assert sorted(p.name for p in latest_checkpoint(out).iterdir()) == ["adapter", "trainer_state.pt"], \
        "a LoRA checkpoint holds the adapter folder and the trainer state, not the whole model"
    cfg = json.loads((latest_checkpoint(out) / "adapter" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == (out / "sft").resolve()
    from emor3.models.checkpoint import content_hash

    fingerprint = json.loads((latest_checkpoint(out) / "adapter" / "base_fingerprint.json").read_text())
    assert fingerprint["sha256"] == content_hash(out / "sft"), "merge checks the base against this record"

    # Cold-Start SFT trained adapters and merged them: linear weights moved, everything else (embeddings) did not
    init, sft = load_pretrained(out / "init").state_dict(), load_pretrained(out / "sft").state_dict()
    assert torch.equal(init["model.embed_tokens.weight"], sft["model.embed_tokens.weight"])
    assert not torch.equal(init["model.layers.0.self_attn.q_proj.weight"], sft["model.layers.0.self_attn.q_proj.weight"])
    # GRPO trained only the adapters: the policy's base weights are the Cold-Start model's, bit for bit
    policy = load_policy(full, latest_checkpoint(out), out / "sft", torch.device("cpu"))
    state = policy.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sft.items()), "GRPO changed a base weight"
    mods = lora_modules(policy)
    assert len(mods) == len([n for n, m in policy.named_modules() if isinstance(m, LoRALinear)]) > 0
    assert all(m.lora_B.weight.abs().sum() > 0 for m in mods.values()), "an adapter never moved (B starts at 0)"
    # the reference is the policy with adapters off: equal at step 1 (fresh adapters), apart after one update
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] < 1e-7 and rows[1]["kl"] > 0, [r["kl"] for r in rows]

    half = tiny_config(tmp_path / "b", model=lora, reward={"plugins": [plugin]}, grpo={"steps": 1})
    train(half)
    out_b = Path(half.run.out)
    train(parse_args(["--resume", str(out_b), "--grpo.steps", "2"], "test", ""))
    with safe_open(latest_checkpoint(out) / "adapter/adapter_model.safetensors", "pt") as fa, \
            safe_open(latest_checkpoint(out_b) / "adapter/adapter_model.safetensors", "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        diff = [k for k in fa.keys() if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
    assert not diff, f"2 LoRA steps in one go differ from 1 + resume + 1 in {diff[:3]}"
    mb = [json.loads(x) for x in (out_b / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] == mb[1]["loss"] and rows[1]["kl"] == mb[1]["kl"]


@pytest.mark.parametrize("flags,message", [
    (["--model.lora-rank", "-1"], "lora-rank -1"),
    (["--model.lora-rank", "4", "--model.lora-targets", "q_proj,qkv"], "valid names: q_proj"),
    (["--model.lora-rank", "4", "--model.lora-dropout", "1.0"], "lora-dropout"),
    (["--model.lora-rank", "4", "--model.lora-alpha", "0"], "lora-alpha"),
    (["--model.lora-rank", "4", "--reward.judge", "reference"], "judge reference"),
])
def test_bad_lora_settings_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags, "test", "")
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_lora_on_two_ranks_equals_one(tmp_path, plugin_dir):
    """torchrun, 2 processes, FSDP2: the adapters' global gradient and the step's metrics (KL from the sharded
    policy with its adapters off included) equal the single-process LoRA step of the same global batch."""
    def config(name, model=""):  # test_distributed's run (its pinned choices), with LoRA
        cfg = dist_tests._config(tmp_path, name, steps=1, model=model)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_rank=4, lora_alpha=8.0,
                                                                  lora_targets=list(ALL)))

    single = config("single")
    train(single)
    two = config("two", model=str(Path(single.run.out) / "init"))
    proc = dist_tests._torchrun(two, plugin_dir)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    a, b = Path(single.run.out), Path(two.run.out)
    assert sorted(dist_tests._adam_moment(b)) == sorted(dist_tests._adam_moment(a))
    assert all(".lora_" in k for k in dist_tests._adam_moment(b)), "2 ranks trained a base weight"
    dist_tests._assert_same_gradient(a, b, "LoRA, 2 processes vs 1")
    dist_tests._assert_same_metrics(dist_tests._metrics(a), dist_tests._metrics(b), "LoRA, 2 processes vs 1")
