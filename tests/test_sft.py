"""Cold-Start SFT: its examples (SET and RER judge answers), that training lowers the response NLL, and the tiny
model's instruct stage: its examples, its cache, and that a run starts from it."""

import json
from collections import Counter
from pathlib import Path

import torch

from emor3.config import SFTConfig
from emor3.data import get_taxonomy
from emor3.models import Processor, load_pretrained
from emor3.rewards import SET_INSTRUCTION, parse_set
from emor3.rewards.reflection import COHERENCE_QUESTION, CONSISTENCY_QUESTION, words
from emor3.stages.cold_start import judge_examples, set_examples, sft
from emor3.toy.emoscenes import CUE_QUESTIONS, DESCRIBE_QUESTION, cue_mentions, instruct_scenes, make_emoscenes
from emor3.toy.instruct import instruct_examples
from emor3.toy.model import build_tiny_checkpoint, tokenizer_corpus


def _text(example) -> str:
    return " ".join(c.get("text", "") for m in example.messages for c in m["content"] if isinstance(c, dict))


def _cold(n=8):
    data = make_emoscenes(seed=0, n_train=32, n_test=0, n_ood=0, image_size=56, n_coldstart=n)
    cold = data["coldstart"]
    return cold, [cold.image(i) for i in range(len(cold))], [s.metadata["response"] for s in cold.samples]


def test_set_and_judge_examples():
    cold, images, responses = _cold()
    tax = {"mikels8": get_taxonomy("mikels8")}
    sets = set_examples(cold.samples, images, responses, tax)
    assert len(sets) == 8 and all(SET_INSTRUCTION in _text(e) and e.images == [im] for e, im in zip(sets, images))
    judges = judge_examples(cold.samples, images, responses, tax, seed=0)
    cons = [e for e in judges if CONSISTENCY_QUESTION in _text(e)]
    coh = [e for e in judges if COHERENCE_QUESTION in _text(e)]
    assert len(cons) == 16 and len(coh) == 8, "per sample: a yes, a no and a coherence example"
    for i, s in enumerate(cold.samples):
        yes, no = cons[2 * i], cons[2 * i + 1]
        own = parse_set(responses[i]).step1
        assert yes.response == "yes" and own in _text(yes) and yes.images == [images[i]]
        assert no.response == "no" and own not in _text(no) and no.images == [images[i]], \
            "the 'no' example must pair the image with another sample's step 1"
        assert coh[i].response == s.label and coh[i].images == [], "coherence is text only and answers the label"
        assert ", ".join(tax["mikels8"].labels) in _text(coh[i])


def test_sft_lowers_the_response_nll(tmp_path):
    tax = {"mikels8": get_taxonomy("mikels8")}
    build_tiny_checkpoint(tmp_path / "m", tokenizer_corpus(tax.values()), seed=0, vocab_size=512, image_pixels=56 * 56)
    model, proc = load_pretrained(tmp_path / "m"), Processor.from_pretrained(tmp_path / "m")
    cold, images, responses = _cold(4)
    examples = set_examples(cold.samples, images, responses, tax) + judge_examples(cold.samples, images, responses, tax)
    losses = sft(model, proc, examples, SFTConfig(steps=12, batch_size=8, lr=3e-3), progress=False)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, f"SFT did not lower the NLL: {losses}"


# ------------------------------------------------------------------------------------------------ instruct stage


def test_instruct_examples_describe_and_check_the_scene_without_labels():
    scenes = instruct_scenes(12, seed=0, image_size=56)
    images = [s.open_image() for s in scenes]
    examples = instruct_examples(scenes, images, seed=0)
    assert len(examples) == 4 * len(scenes)
    labels = set(get_taxonomy("mikels8").labels) | set(get_taxonomy("emotion6").labels)
    asked = Counter()
    for i, s in enumerate(scenes):
        describe, question, yes, no = examples[4 * i : 4 * i + 4]
        cues = s.metadata["cues"]
        assert all(e.images == [images[i]] for e in (describe, question, yes, no)), "every example shows its scene"
        assert DESCRIBE_QUESTION in _text(describe)
        (kind,) = [k for k, (q, _) in CUE_QUESTIONS.items() if q == _text(question).strip()]
        assert question.response == CUE_QUESTIONS[kind][1][cues[kind]], "a cue question answers with the true cue"
        asked[kind] += 1
        seen = cue_mentions(describe.response, cues)
        assert seen.recall == 1.0 and not seen.wrong, describe.response
        assert yes.response == "yes" and no.response == "no"
        assert CONSISTENCY_QUESTION in _text(yes) and CONSISTENCY_QUESTION in _text(no)
        claimed_yes = cue_mentions(_text(yes).split(CONSISTENCY_QUESTION)[1], cues)
        claimed_no = cue_mentions(_text(no).split(CONSISTENCY_QUESTION)[1], cues)
        assert claimed_yes.recall == 1.0 and not claimed_yes.wrong, "'yes' must pair the scene with its own description"
        assert claimed_no.wrong, "'no' must pair the scene with a description that claims a cue it lacks"
        for e in (describe, question, yes, no):
            assert not labels & set(words(e.response + " " + _text(e))), "the instruct stage teaches no emotion label"
    assert set(asked) == set(CUE_QUESTIONS), f"every cue kind is asked about: {asked}"
    # the scenes are drawn from their own seeds: no image of a benchmark split is among them
    bench = make_emoscenes(seed=0, n_train=12, n_test=12, n_ood=12, image_size=56)
    keys = {s.image.key for ds in bench.values() for s in ds.samples}
    assert not keys & {s.image.key for s in scenes}
    again = instruct_scenes(12, seed=0, image_size=56)
    assert [s.image.key for s in again] == [s.image.key for s in scenes], "seeded: the same scenes every time"


def test_instruct_scenes_cover_every_rendering_with_balanced_cues():
    from emor3.toy.emoscenes import INSTRUCT_STYLES, SHIFTED_STYLE, SceneImage, all_cue_combinations

    assert SHIFTED_STYLE in INSTRUCT_STYLES, "the instruct model must see the rendering of ood_render"
    scenes = instruct_scenes(128, seed=0, image_size=56)
    for style in INSTRUCT_STYLES:
        part = [s for s in scenes if s.metadata["rendering"] == style.palette]
        assert len(part) == 64 and all(isinstance(s.image, SceneImage) and s.image.style == style for s in part)
        combos = Counter(tuple(sorted(s.metadata["cues"].items())) for s in part)
        assert len(combos) == len(all_cue_combinations()) and set(combos.values()) == {2}, \
            "each rendering gets full rounds of the 32 cue combinations"
    longer = instruct_scenes(200, seed=0, image_size=56)
    assert [s.image.key for s in longer[:128]] == [s.image.key for s in scenes], \
        "a longer list starts with the shorter one (the held-out scenes follow the training scenes)"


def _count_sft_calls(monkeypatch) -> list[str]:
    import emor3.stages.cold_start as cold_start_module
    import emor3.toy.instruct as instruct_module

    calls, real = [], cold_start_module.sft

    def counted(*a, desc="Cold-Start SFT", **kw):
        calls.append(desc)
        return real(*a, desc=desc, **kw)

    monkeypatch.setattr(cold_start_module, "sft", counted)
    monkeypatch.setattr(instruct_module, "sft", counted)
    return calls


def test_instruct_stage_is_cached_and_the_run_starts_from_it(tmp_path, monkeypatch):
    from test_train import tiny_config

    from emor3.config import parse_args
    from emor3.grpo.train import train
    from emor3.stages.build import build
    from emor3.toy.instruct import find_instruct
    from emor3.toy.world import WORLD

    cache = tmp_path / "instruct-cache"
    stage = {"instruct_steps": 3, "instruct_images": 8, "instruct_batch_size": 4, "instruct_cache": str(cache)}
    calls = _count_sft_calls(monkeypatch)
    first = tiny_config(tmp_path / "a", sft=stage, grpo={"steps": 1})
    train(first)
    out = Path(first.run.out)
    assert calls == ["instruct stage", "Cold-Start SFT"]
    (built,) = [p for p in cache.iterdir() if not p.name.startswith(".")]  # .KEY.lock: the builder's lock
    init, instruct = _params(out / "init"), _params(out / "instruct")
    assert _same(_params(built), instruct), "RUN_DIR/instruct is the cached checkpoint"
    assert any(not torch.equal(init[k], instruct[k]) for k in init), "the instruct stage trained nothing"
    recall = json.loads((out / "instruct" / "instruct.json").read_text())["caption_cue_recall"]
    assert set(recall) == {"base", "shifted"}, "the held-out descriptions are scored per rendering"
    for r in recall.values():
        assert set(r) == {"face", "sky", "object", "all"} and all(0.0 <= v <= 1.0 for v in r.values())

    calls.clear()
    second = tiny_config(tmp_path / "b", sft=stage, grpo={"steps": 1})
    train(second)
    assert calls == ["Cold-Start SFT"], "the same settings reuse the cached instruct checkpoint"
    assert _same(_params(Path(second.run.out) / "instruct"), instruct)
    assert _same(_params(Path(second.run.out) / "sft"), _params(out / "sft")), "a run from the cache is the same run"

    resumed = build(parse_args(["--resume", str(out)], "test", ""), out, WORLD)
    assert resumed.source_dir == out / "instruct", "a resumed run starts from its instruct model, not the init"

    train(tiny_config(tmp_path / "c", sft={**stage, "instruct_steps": 4}, grpo={"steps": 1}))
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2, "another setting builds (and caches) another instruct checkpoint"

    def found(name, sft=stage, **sections):
        cfg = tiny_config(tmp_path / name, sft=sft, grpo={"steps": 1}, **sections)
        run = build(cfg, Path(cfg.run.out), WORLD)
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        where = find_instruct(cfg, run.source_dir)
        assert _same(run.model.state_dict(), before), "a lookup must not touch the run's model"
        return where

    assert found("f", run={"seed": 1}) == (built, built), "every run seed starts from the same instruct checkpoint"
    cache_other, none = found("g", {**stage, "instruct_seed": 1})
    assert none is None and cache_other != built, "another instruct seed is another setting"


def test_the_default_run_finds_the_shipped_instruct_checkpoint(tmp_path):
    """The default setting's instruct checkpoint ships in emor3/assets/instruct/<key>: the key the default run
    computes must name it (else a fresh clone's `make train` silently spends the stage's time building its own),
    and the checkpoint must load and say how well it sees."""
    from emor3.config import Config, DataConfig, RunConfig
    from emor3.stages.build import build
    from emor3.toy.instruct import SHIPPED_INSTRUCT, find_instruct
    from emor3.toy.world import WORLD

    cfg = Config(data=DataConfig(cache_dir=str(tmp_path / "emoscenes")),
                 run=RunConfig(out=str(tmp_path / "run"), progress=False))
    run = build(cfg, tmp_path / "run", WORLD)
    cache, found = find_instruct(cfg.resolved(), run.source_dir)
    shipped = sorted(p.name for p in SHIPPED_INSTRUCT.iterdir() if p.is_dir())
    assert found == SHIPPED_INSTRUCT / cache.name, f"default key {cache.name}, shipped {shipped}: run `make instruct`"
    assert shipped == [cache.name], "one shipped checkpoint, the default's"
    meta = json.loads((found / "instruct.json").read_text())
    assert (meta["steps"], meta["scenes"], meta["seed"]) == (cfg.sft.instruct_steps, cfg.sft.instruct_images,
                                                              cfg.sft.instruct_seed)
    model = load_pretrained(found)
    assert model.config == run.model.config, "the shipped checkpoint is the default's architecture"
    assert all(r["all"] > 0.9 for r in meta["caption_cue_recall"].values()), meta["caption_cue_recall"]


def _params(folder: Path) -> dict:
    return dict(load_pretrained(folder).state_dict())


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_instruct_key_reads_what_the_project_controls_not_library_bytes(tmp_path):
    """The shipped checkpoint's key must survive a tokenizers release that writes tokenizer.json differently (key
    order, indentation, merges as "a b" strings or [a, b] pairs), and change with the tokenizer's vocabulary, the
    initial weights and the stage's settings."""
    import dataclasses
    import shutil
    from types import SimpleNamespace

    from emor3.config import Config
    from emor3.toy.instruct import SHIPPED_INSTRUCT, instruct_key

    (shipped,) = [p for p in SHIPPED_INSTRUCT.iterdir() if p.is_dir()]
    weights = {"w": torch.arange(6, dtype=torch.float32)}
    model = SimpleNamespace(state_dict=lambda: weights)
    cfg = Config()

    def folder(name: str, edit=None) -> Path:
        d = tmp_path / name
        d.mkdir()
        shutil.copy(shipped / "config.json", d / "config.json")
        tok = json.loads((shipped / "tokenizer.json").read_text())
        if edit:
            edit(tok)
        (d / "tokenizer.json").write_text(json.dumps(tok, indent=None if edit else 2, sort_keys=bool(edit)))
        return d

    def rewritten(tok):  # the same tokenizer as another release might write it
        tok["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]

    def renumbered(tok):  # another vocabulary: two tokens swap ids
        vocab = tok["model"]["vocab"]
        a, b = sorted(vocab)[:2]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    key = instruct_key(model, folder("a"), cfg)
    assert instruct_key(model, folder("b", rewritten), cfg) == key, "the key hashed library-written bytes"
    assert instruct_key(model, folder("c", renumbered), cfg) != key, "another vocabulary must be another key"
    other = SimpleNamespace(state_dict=lambda: {"w": weights["w"] + 1})
    assert instruct_key(other, folder("d"), cfg) != key, "other initial weights must be another key"
    steps = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, instruct_steps=7))
    assert instruct_key(model, folder("e"), steps) != key, "another setting must be another key"
