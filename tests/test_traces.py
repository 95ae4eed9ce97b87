"""Cold-Start traces by rejection sampling (python -m emor3.sft traces): what is kept, what is counted, and the
manifest it writes, with a scripted sampler and end to end with a tiny teacher fine-tuned to one SET answer."""

import json
from collections import Counter
from types import SimpleNamespace

import torch
from PIL import Image

import emor3.traces as traces_module
from emor3.config import Config, DataConfig, SFTConfig
from emor3.data import get_taxonomy, load_dataset
from emor3.stages.build import build_data
from emor3.models import Processor, load_pretrained, save_pretrained
from emor3.toy.model import build_tiny_checkpoint
from emor3.rewards import accuracy_reward, format_reward
from emor3.stages.cold_start import SFTExample, cold_start, sft
from emor3.toy.model import tokenizer_corpus
from emor3.traces import TraceReport, make_traces, trace_order, traces_main
from emor3.engine.prompts import build_set_messages

MIKELS = get_taxonomy("mikels8")


def _trace(label: str) -> str:
    return f"<step1>A wide bright field.</step1><step2>People feel calm.</step2><step3>positive, low</step3>\\boxed{{{label}}}"


def _dataset(tmp_path, labels, question=None):
    rows = []
    for i, lab in enumerate(labels):
        Image.new("RGB", (56, 56), (30 * i % 255, 90, 160)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "label": lab, "id": f"s{i}", "source": "test"}
                    | ({"question": question} if question and i == 0 else {}))
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f, load_dataset(f, "mikels8")


class _Batch:
    def __init__(self, n):
        self.n = n

    def to(self, device):
        return self


class _FakeProcessor:
    stop_token_ids, banned_token_ids = (0,), ()

    def encode_prompts(self, messages, images, **kw):
        return _Batch(len(messages))

    def answer(self, text):
        return text


def test_rejection_sampling_keeps_one_passing_response_per_image(tmp_path, monkeypatch):
    _, ds = _dataset(tmp_path, ["awe", "fear", "sadness", "awe"], question="Which feeling? {labels}")
    bad = "no steps at all \\boxed{awe}"
    script = {  # per sample id: the K = 3 responses the "teacher" gives, and whether each hit the length cap
        "s0": [(bad, False), (_trace("fear"), False), (_trace("awe"), False)],      # kept the third
        "s1": [(_trace("fear"), False), (_trace("fear"), False), (bad, True)],      # kept 1, surplus 1, truncated 1
        "s2": [(_trace("awe"), False), ("<step1>cut", True), (_trace("fear"), False)],  # nothing kept
        "s3": [(_trace("awe"), False)] * 3,
    }
    order = trace_order(ds.samples, seed=0)
    assert sorted(order) == [0, 1, 2, 3] and {ds.samples[i].label for i in order[:3]} == {"awe", "fear", "sadness"}, \
        "labels are taken in turn"
    seen = []

    class Roll:
        def __init__(self, ids, K):
            rows = [r for sid in ids for r in script[sid]]
            self.texts = [t for t, _ in rows]
            self.truncated = torch.tensor([tr for _, tr in rows])  # (N,)
            self.prompt_index = torch.arange(len(ids)).repeat_interleave(K)  # (N,)

    def fake_sample(model, batch, *, group_size, **kw):
        ids = seen[-1]
        assert batch.n == len(ids) and group_size == 3
        return Roll(ids, group_size)

    real_encode = traces_module.encode_samples

    def spy_encode(processor, samples, images, taxonomies):
        seen.append([s.id for s in samples])
        return real_encode(processor, samples, images, taxonomies)

    monkeypatch.setattr(traces_module, "sample", fake_sample)
    monkeypatch.setattr(traces_module, "encode_samples", spy_encode)
    kept, rep = make_traces(torch.nn.Linear(1, 1), _FakeProcessor(), ds, n=2, per_image=3,
                            taxonomies={"mikels8": MIKELS}, max_new_tokens=8, batch_size=2, progress=False)
    batches = [[ds.samples[i].id for i in order[:2]], [ds.samples[i].id for i in order[2:4]]]
    assert seen == batches[: len(seen)]
    n_tried = sum(len(b) for b in seen)
    assert rep.images_tried == n_tried and rep.sampled == 3 * n_tried
    assert rep.sampled == rep.kept + rep.surplus + rep.wrong_label + rep.bad_format, "every response is counted once"
    assert rep.kept == len(kept) <= 2
    for i, text in kept.items():
        assert format_reward(text) == 1.0 and accuracy_reward(text, ds.samples[i].label) == 1.0
    # by hand: seed 0 tries s0, s1 first; s0 -> 1 bad format, 1 wrong label, 1 kept; s1 -> 1 kept, 1 surplus,
    # 1 bad format (truncated); n = 2 reached, so s2 and s3 are never sampled
    assert seen == [["s0", "s1"]]
    assert rep == TraceReport(images_tried=2, sampled=6, kept=2, surplus=1, wrong_label=1, bad_format=2, truncated=1,
                              kept_per_label=Counter({"awe": 1, "fear": 1}))
    assert kept == {0: _trace("awe"), 1: _trace("fear")}, "each image keeps its first passing response"
    # the manifest: every sample, its own question and metadata kept, a response where one was kept
    rows = traces_module.trace_rows(ds, kept)
    assert [r.get("response") for r in rows] == [_trace("awe"), _trace("fear"), None, None]
    assert rows[0]["question"] == "Which feeling? {labels}" and "question" not in rows[1] and rows[2]["source"] == "test"
    assert [r["id"] for r in traces_module.trace_rows(ds, kept, only_traces=True)] == ["s0", "s1"]


def test_traces_command_end_to_end_with_a_fine_tuned_tiny_teacher(tmp_path, capsys):
    # a tiny teacher that always answers one SET trace boxing "awe": its awe image is kept, its fear one is not
    teacher = tmp_path / "teacher"
    build_tiny_checkpoint(teacher, tokenizer_corpus([MIKELS]) + [_trace("awe")], seed=0, vocab_size=512,
                          image_pixels=56 * 56)
    model, proc = load_pretrained(teacher), Processor.from_pretrained(teacher)
    images = [Image.new("RGB", (56, 56), c) for c in ((200, 40, 40), (40, 40, 200))]
    examples = [SFTExample(build_set_messages(MIKELS), [im], _trace("awe")) for im in images]
    sft(model, proc, examples, SFTConfig(steps=60, batch_size=2, lr=5e-3), progress=False)
    save_pretrained(model, teacher, tokenizer_dir=teacher)

    data, ds = _dataset(tmp_path, ["awe", "fear"])
    out = tmp_path / "traces.jsonl"
    rep = traces_main(["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--n", "5",
                       "--per-image", "2", "--temperature", "0", "--max-new-tokens", "64", "--progress", "false"])
    printed = capsys.readouterr().out
    assert rep.images_tried == 2 and rep.sampled == 4
    assert rep.sampled == rep.kept + rep.surplus + rep.wrong_label + rep.bad_format
    assert (rep.kept, rep.surplus, rep.wrong_label, rep.bad_format) == (1, 1, 2, 0), printed
    assert "1 kept, 1 surplus" in printed and "2 wrong label, 0 bad format" in printed and "2 asked" not in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["s0", "s1"], "every sample is written, traced or not"
    assert rows[0]["response"] == _trace("awe") and "response" not in rows[1]
    assert rows[0]["source"] == "test" and rows[0]["image"] == str((tmp_path / "0.png").resolve())
    report = json.loads((tmp_path / "traces.jsonl.report.json").read_text())
    assert report["kept"] == 1 and report["kept_per_label"] == {"awe": 1}
    # the manifest is a training set whose traced rows are the Cold-Start set
    train, cold, _ = build_data(Config(data=DataConfig(train=str(out), taxonomy="mikels8")))
    assert len(train) == 2 and [s.id for s in cold.samples] == ["s0"]
    assert cold.samples[0].metadata["response"] == _trace("awe")


def test_sft_skipped_message_says_how_to_make_traces(tmp_path, capsys):
    data, _ = _dataset(tmp_path, ["awe", "fear"])

    cfg = Config(data=DataConfig(train=str(data)), sft=SFTConfig(instruct_steps=0))
    run = SimpleNamespace(model=None, cold_start=None)  # what cold_start reads of a Run: no cold-start set
    cold_start(cfg, run, tmp_path / "run")
    msg = capsys.readouterr().out
    assert "skipping Cold-Start SFT" in msg
    assert f"python -m emor3.sft traces --teacher CHECKPOINT --data {data} --n 100 --per-image 4" in msg
