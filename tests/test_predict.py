"""python -m emor3.predict on tiny trained runs (full fine-tuning and LoRA): which folders --model takes, one record
per image in input order, a clear error per unreadable image while the rest go on, seeded and greedy sampling, RER's
self-checks wired to the right rows, and the text and JSONL outputs."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from emor3 import predict
from emor3.data import get_taxonomy
from emor3.grpo.train import train
from emor3.models.lora import has_lora
from emor3.rewards import format_reward
from test_train import PLUGIN, tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs of 2 GRPO steps: full fine-tuning and LoRA (rank 4), sharing one EmoScenes cache. A length
    reward varies within every group, so the untrained model's advantages are not all zero and the adapters move."""
    root = tmp_path_factory.mktemp("predict")
    (root / "emor3_predict_plugin.py").write_text(PLUGIN)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        for name, model in (("full", {}), ("lora", {"lora_rank": 4, "lora_alpha": 8.0})):
            cfg = tiny_config(root, model=model, run={"threads": 1},
                              reward={"plugins": ["emor3_predict_plugin:length_reward=1.0"]})
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=str(root / name)))
            train(cfg)
            out[name] = root / name
    return out


@pytest.fixture(scope="module")
def images(runs, tmp_path_factory):
    """A folder of three EmoScenes test images, a corrupt .jpg and an empty .png, in a nested folder."""
    folder = tmp_path_factory.mktemp("images")
    test_images = sorted((runs["full"].parent / "emoscenes").rglob("images/test/*.png"))[:3]
    assert len(test_images) == 3
    (folder / "sub").mkdir()
    for i, p in enumerate(test_images):
        Image.open(p).save(folder / ("sub" if i == 2 else "") / f"scene{i}.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image: skipped in a folder")
    return folder


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resolve_model_takes_runs_checkpoints_and_folders(runs, tmp_path):
    full, lora = runs["full"], runs["lora"]
    src = predict.resolve_model(full)
    assert src.weights == full / "checkpoint-2" / "model" and src.adapter is None and src.run_dir == full
    assert predict.resolve_model(full / "checkpoint-2") == src
    assert predict.resolve_model(full / "sft") == predict.ModelSource(full / "sft")  # a Hugging Face folder
    src = predict.resolve_model(lora)
    assert src.adapter == lora / "checkpoint-2" / "adapter", "a LoRA run's policy is its adapter over its base"
    assert src.weights.resolve() == (lora / "sft").resolve(), "the adapter's base is the Cold-Start checkpoint"
    assert predict.resolve_model(lora / "checkpoint-2" / "adapter").adapter == lora / "checkpoint-2" / "adapter"
    with pytest.raises(ValueError, match="holds an adapter already"):
        predict.resolve_model(lora, adapter=lora / "checkpoint-2" / "adapter")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        predict.resolve_model(tmp_path)


def test_lora_checkpoint_loads_its_adapter(runs):
    src = predict.resolve_model(runs["lora"])
    model, processor = predict.load_model(src, device="cpu")
    base, _ = predict.load_model(predict.ModelSource(src.weights), device="cpu")
    assert has_lora(model) and not has_lora(base)
    ids = torch.tensor([[1, 2, 3, 4]])
    pos = torch.arange(4).view(1, 1, 4).expand(3, 1, 4)
    with torch.no_grad():
        logits = [m.logits(m(ids, pos, torch.ones(1, 4))) for m in (model, base)]  # (1, 4, V) each
    diff = (logits[0] - logits[1]).abs().max()
    assert diff > 0, "the trained adapter must change the model's outputs (is it loaded?)"


def test_folder_json_one_record_per_input_and_errors_go_on(runs, images, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    missing = tmp_path / "missing.png"
    rc = predict.main(["--model", str(runs["full"]), str(images), str(missing), "--json", "--out", str(out),
                       "--max-new-tokens", "12", "--batch-size", "2"])
    assert rc == 1, "an unreadable input makes the exit status non-zero"
    recs = _jsonl(out)
    assert [Path(r["image"]).name for r in recs] == ["corrupt.jpg", "empty.png", "scene0.png", "scene1.png",
                                                     "scene2.png", "missing.png"], "inputs in order, a folder sorted"
    errors = {Path(r["image"]).name: r["error"] for r in recs if "error" in r}
    assert set(errors) == {"missing.png", "corrupt.jpg", "empty.png"}
    assert "cannot be decoded" in errors["corrupt.jpg"] and "empty" in errors["empty.png"]
    err = capsys.readouterr().err
    for name in errors:
        assert f"error: {images / name if name != 'missing.png' else missing}" in err, f"{name} named on stderr"
    assert "3 of 6 input(s) failed" in err and "predict:" in err, "a folder input shows the progress bar"
    mikels = get_taxonomy("mikels8").labels
    for r in recs[2:5]:
        assert set(r) == {"image", "label", "answer", "format", "steps", "completion", "truncated"}
        assert r["label"] is None or r["label"] in mikels
        assert r["format"] == bool(format_reward(r["completion"]))


def test_seeded_sampling_repeats_and_greedy_ignores_the_seed(runs, images, tmp_path):
    scene = [str(p) for p in sorted(images.rglob("scene*.png"))]

    def run(*flags):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl"
        assert predict.main(["--model", str(runs["full"]), *scene, "--json", "--out", str(out),
                             "--max-new-tokens", "12", *flags]) == 0
        return [r["completion"] for r in _jsonl(out)]

    a = run("--seed", "3", "--temperature", "1.0")
    assert a == run("--seed", "3", "--temperature", "1.0"), "the same seed must give the same completions"
    assert a != run("--seed", "4", "--temperature", "1.0"), "another seed must draw other completions"
    assert run("--seed", "3", "--temperature", "0") == run("--seed", "4", "--temperature", "0"), "greedy is seed-free"


def test_lora_run_predicts_as_its_base_plus_adapter(runs, images, tmp_path):
    scene = str(next(images.rglob("scene0.png")))
    lora = runs["lora"]
    outs = []
    for model in (["--model", str(lora)], ["--model", str(lora / "sft"), "--adapter",
                                           str(lora / "checkpoint-2" / "adapter")]):
        out = tmp_path / f"{len(outs)}.jsonl"
        assert predict.main([*model, scene, "--json", "--out", str(out), "--max-new-tokens", "12",
                             "--temperature", "0"]) == 0
        outs.append(_jsonl(out))
    assert outs[0][0]["completion"] == outs[1][0]["completion"]


def test_reflect_scores_rows_by_their_steps(runs, images, tmp_path, monkeypatch):
    """Completions replaced by fixed SET replies; the judge is the tiny model itself, through ModelJudge."""
    texts = ["<step1>A smiling face.</step1><step2>Warm.</step2><step3>Positive.</step3>\\boxed{Amusement}",
             "<step1>A spider.</step1><step2>Uneasy.</step2><step3>Negative.</step3>\\boxed{happy}",
             "no steps and no box"]
    real = predict.sample
    monkeypatch.setattr(predict, "sample", lambda *a, **k: dataclasses.replace(real(*a, **k), texts=texts))
    scene = [str(p) for p in sorted(images.rglob("scene*.png"))]
    out = tmp_path / "r.jsonl"
    assert predict.main(["--model", str(runs["full"]), *scene, "--json", "--out", str(out), "--reflect",
                         "--max-new-tokens", "4"]) == 0
    good, no_label, no_steps = _jsonl(out)
    assert good["label"] == "amusement" and good["format"] and good["steps"]["step1"] == "A smiling face."
    assert no_label["label"] is None and no_label["answer"] == "happy"
    for r in (good, no_label):
        assert isinstance(r["consistency"]["reply"], str) and r["consistency"]["score"] in (0.0, 0.5, 1.0)
        assert isinstance(r["coherence"]["reply"], str)
    assert good["coherence"]["score"] in (0.0, 0.5, 1.0)
    assert no_label["coherence"]["score"] is None, "no predicted label: nothing to score coherence against"
    assert no_steps["consistency"] == {"reply": None, "score": None}, "step 1 missing: the judge is not asked"
    assert no_steps["coherence"] == {"reply": None, "score": None}


def test_text_output_and_usage_errors(runs, images, capsys):
    scene = str(next(images.rglob("scene0.png")))
    corrupt = str(images / "corrupt.jpg")
    assert predict.main(["--model", str(runs["full"]), scene, corrupt, "--max-new-tokens", "8"]) == 1
    cap = capsys.readouterr()
    assert cap.out.startswith(scene + "\n") and "  label: " in cap.out
    assert corrupt not in cap.out, "errors go to stderr in text mode"
    assert f"error: {corrupt}: " in cap.err and "predict:" not in cap.err, "no bar without a folder input"
    with pytest.raises(SystemExit) as e:
        predict.main(["--model", str(runs["full"]), scene, "--taxonomy", "nosuch"])
    assert e.value.code == 2 and "--taxonomy" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0
    helptext = capsys.readouterr().out
    for flag in ("--model", "--adapter", "--taxonomy", "--reflect", "--json", "--out", "--seed", "--temperature",
                 "--top-p", "--max-new-tokens", "--batch-size", "--min-pixels", "--max-pixels", "--dtype", "--device",
                 "--threads", "--progress"):
        assert flag in helptext, f"{flag} missing from --help"


def test_predicted_label_follows_the_paper_accuracy_rule():
    e6 = get_taxonomy("emotion6")
    assert predict.predicted_label("surprise", e6) == "surprise"
    assert predict.predicted_label("happy", e6) is None, "a synonym is not the label under the paper's rule"
    assert predict.predicted_label(None, e6) is None
