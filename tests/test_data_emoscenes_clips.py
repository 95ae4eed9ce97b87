"""EmoScenes clips: one frame is not enough, the splits keep the image benchmark's rules, the folder loads."""

import hashlib
import json

import numpy as np
import pytest

from emor3.data.clip_source import ClipFiles
from emor3.toy.emoscenes import (AROUSAL_OF_SKY, FAMILY_OF_OBJECT, HELD_OUT_COMBINATIONS, VALENCE_OF_FACE,
                                  all_cue_combinations, cue_mentions, rule_label)
from emor3.toy.emoscenes_clips import (CHANGING, CONTROLS, FRAME_COUNTS, NEUTRAL, SPLITS, SceneClip, clip_trace,
                                        eval_split_names, frame_states, make_clip_split, make_emoscenes_clips,
                                        write_emoscenes_clips)
from emor3.data.loaders import load_manifest
from emor3.models.clips import Clip
from emor3.rewards import parse_set

PROPERTY = {"face": VALENCE_OF_FACE, "sky": AROUSAL_OF_SKY, "object": FAMILY_OF_OBJECT}


def _digest(img) -> str:
    return hashlib.sha1(np.asarray(img).tobytes()).hexdigest()


def test_an_endpoint_frame_leaves_two_labels_that_differ_in_the_changed_cue():
    # over the whole table: what the first (= last) frame shows (two cue values, the changed cue neutral) is shared
    # by exactly the combinations that differ in the changed cue, and they give two labels, one per property value
    for changed in CHANGING:
        seen: dict = {}
        for cues in all_cue_combinations():
            states = frame_states(cues, changed, 6, (1, 4))
            assert states[0] == states[-1] and states[0][changed] == NEUTRAL[changed], "endpoints show the cue"
            assert all(s == cues for s in states[1:4]), "the event frames must show every cue's value"
            seen.setdefault(tuple(sorted(states[0].items())), set()).add(
                (rule_label(cues), PROPERTY[changed][cues[changed]]))
        for view, labels in seen.items():
            assert len({lab for lab, _ in labels}) == 2, f"{changed}: {view} must leave two labels, got {labels}"
            assert len({prop for _, prop in labels}) == 2, "the two labels must differ in the changed property"


@pytest.mark.parametrize("changed,a,b", [("face", "smile", "frown"), ("sky", "sunny", "night"),
                                         ("object", "gift", "spider")])
def test_clips_differing_in_the_changed_cue_share_first_and_last_frame_pixels(changed, a, b):
    # the same seed draws the same layout: two clips whose changed cue differs are byte-identical at both ends and
    # differ in the event frames (the frame renderer must not let the changed cue move anything else)
    base = {"face": "smile", "sky": "dusk", "object": "heart"}
    clips = [SceneClip(tuple(sorted(dict(base, **{changed: v}).items())), changed, 6, (2, 5), 112,
                       SPLITS["test"].style, "emoscenes-clips:test:pixels") for v in (a, b)]
    fa, fb = (c.frames() for c in clips)
    assert _digest(fa[0]) == _digest(fb[0]) and _digest(fa[-1]) == _digest(fb[-1]), "endpoints must not differ"
    assert _digest(fa[1]) == _digest(fb[1]), "frame 1 is before the event (2, 5)"
    assert all(_digest(fa[k]) != _digest(fb[k]) for k in (2, 3, 4)), "the event frames must show the value"
    assert _digest(fa[0]) != _digest(fa[3]), "the event must change the picture"
    assert rule_label(dict(base, **{changed: a})) != rule_label(dict(base, **{changed: b}))


def test_split_shapes_balance_and_event_windows():
    samples = make_clip_split("train", 48, seed=0)
    kinds = [s.metadata["changed"] for s in samples]
    assert {k: kinds.count(k) for k in CHANGING} == {k: 16 for k in CHANGING}, "changed cues must be balanced"
    labels = [s.label for s in samples]
    assert len(set(labels)) == 8 and all(labels.count(x) == 6 for x in set(labels)), "labels must be balanced"
    for s in samples:
        n, (start, stop) = s.metadata["frames_in_clip"], s.metadata["event"]
        assert n in FRAME_COUNTS and 1 <= start < stop <= n - 1 and stop - start >= n / 2, s.metadata
        clip = s.image.open_clip()
        assert isinstance(clip, Clip) and tuple(clip.frames.shape) == (n, 3, 112, 112) and clip.fps == 2.0


def test_splits_are_disjoint_in_ids_pixels_and_combinations():
    data = make_emoscenes_clips(seed=3, n_train=24, n_test=8, n_ood=8)
    held = set(HELD_OUT_COMBINATIONS)
    ids, pixels = {}, {}
    for name in SPLITS:
        for s in data[name]:
            key = (s.metadata["cues"]["face"], s.metadata["cues"]["sky"], s.metadata["cues"]["object"])
            assert (key in held) == (name == "compositional"), f"{name} drew {key}"
            assert s.id not in ids, f"{s.id} in {name} and {ids.get(s.id)}"
            ids[s.id] = name
            for f in s.image.frames()[1:-1]:  # event frames: every cue drawn, no neutral state shared by chance
                d = _digest(f)
                assert pixels.get(d, name) == name, f"a frame of {name} is also in {pixels[d]}"
                pixels[d] = name
    assert eval_split_names() == ["test", "compositional", "ood_render", "ood_unseen"]
    assert eval_split_names("validation") == ["validation"]


def test_controls_hold_the_first_or_last_frame_of_each_test_clip():
    data = make_emoscenes_clips(seed=0, n_train=0, n_test=6, n_ood=0)
    for name, (base, which) in CONTROLS.items():
        assert [s.label for s in data[name]] == [s.label for s in data[base]]
        for s, orig in zip(data[name], data[base]):
            frames, want = s.image.frames(), orig.image.frames()[0 if which == "first" else -1]
            assert len(frames) == orig.metadata["frames_in_clip"], "the control keeps the clip's length"
            assert all(_digest(f) == _digest(want) for f in frames)
            assert s.id == f"{orig.id}-{which}" and s.metadata["hold"] == which


def test_same_seed_same_bytes_other_seed_other_clips(tmp_path):
    a = write_emoscenes_clips(tmp_path / "a", seed=1, n_train=6, n_test=3, n_ood=3, n_coldstart=2)
    b = write_emoscenes_clips(tmp_path / "b", seed=1, n_train=6, n_test=3, n_ood=3, n_coldstart=2)
    c = write_emoscenes_clips(tmp_path / "c", seed=2, n_train=6, n_test=3, n_ood=3, n_coldstart=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert a["test"].read_text() == b["test"].read_text() != c["test"].read_text()


def test_written_folder_loads_as_clip_samples_with_traces(tmp_path):
    paths = write_emoscenes_clips(tmp_path, seed=0, n_train=16, n_test=4, n_ood=4, n_coldstart=8)
    assert set(paths) == set(SPLITS) | set(CONTROLS) | {"coldstart"}
    row = json.loads(paths["test_last"].read_text().splitlines()[0])
    assert len(set(row["frames"])) == 1 and row["fps"] == 2.0, "a control row repeats one frame file"
    ds = load_manifest(paths["coldstart"], verify="full")
    for i, s in enumerate(ds):
        assert s.is_clip and isinstance(s.image, ClipFiles)
        clip = ds.image(i)
        assert clip.num_frames == s.metadata["frames_in_clip"] and clip.fps == 2.0
        steps = parse_set(s.metadata["response"])
        assert steps.answer == s.label
        m = cue_mentions(steps.step1, s.metadata["cues"])
        assert m.recall == 1.0 and not m.wrong, f"the trace must name the true cues: {steps.step1}"
    # the loaded frames are the drawn ones
    mem = make_clip_split("test", 4, seed=0)
    disk = load_manifest(paths["test"], verify="exists")
    assert all(np.array_equal(disk.image(i).frames.numpy(), mem[i].image.open_clip().frames.numpy())
               for i in range(4))


def test_trace_names_the_change():
    cues = {"face": "frown", "sky": "night", "object": "heart"}
    for changed in CHANGING:
        text = clip_trace(cues, changed)
        assert text.endswith("\\boxed{sadness}")
        assert cue_mentions(parse_set(text).step1, cues).recall == 1.0


def test_cli_writes_clips_only_with_the_flag(tmp_path):
    from emor3.data.__main__ import main
    assert main(["emoscenes", str(tmp_path / "c"), "--variant", "clips", "--n-train", "3", "--n-test", "2",
                 "--n-ood", "2", "--n-coldstart", "0"]) == 0
    assert (tmp_path / "c" / "emoscenes_clips.json").is_file() and (tmp_path / "c" / "test_first.jsonl").is_file()
    assert main(["emoscenes", str(tmp_path / "i"), "--n-train", "3", "--n-test", "2", "--n-ood", "2",
                 "--n-coldstart", "0"]) == 0
    assert (tmp_path / "i" / "emoscenes.json").is_file() and not (tmp_path / "i" / "clips").exists()


def test_manifest_clip_rows_are_checked(tmp_path):
    (tmp_path / "f").mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "f" / "0.png")
    rows = [{"id": "ok", "frames": ["f/0.png", "f/0.png"], "fps": 2, "label": "awe"},
            {"id": "gone", "frames": ["f/0.png", "f/9.png"], "label": "awe"},
            {"id": "both", "frames": ["f/0.png"], "video": "f", "label": "awe"},
            {"id": "badfps", "video": "f", "fps": -1, "label": "awe"},
            {"id": "folder", "video": "f", "fps": 4, "label": "fear"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_manifest(tmp_path / "m.jsonl", on_bad_sample="skip", verify="full")
    assert [s.id for s in ds] == ["ok", "folder"]
    assert dict(ds.report.skipped) == {"missing_file": 1, "malformed_line": 2}
    assert ds.image(1).fps == 4.0 and ds.image(0).num_frames == 2
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]))
    with pytest.raises(Exception, match=r"m.jsonl:2: sample 'gone': clip file .*9.png does not exist"):
        load_manifest(tmp_path / "m.jsonl", verify="exists")


def test_changed_cue_right_reads_the_changed_property_of_the_label():
    from emor3.toy.emoscenes_clips import changed_cue_right
    cues = {"face": "smile", "sky": "sunny", "object": "gift"}  # amusement: positive, high, personal
    assert changed_cue_right("amusement", cues, "face")
    assert changed_cue_right("excitement", cues, "face"), "wrong family, but the face's valence is right"
    assert not changed_cue_right("anger", cues, "face"), "negative: the face's valence is wrong"
    assert changed_cue_right("anger", cues, "sky") and not changed_cue_right("contentment", cues, "sky")
    assert changed_cue_right("contentment", cues, "object") and not changed_cue_right("awe", cues, "object")
    assert not changed_cue_right(None, cues, "face") and not changed_cue_right("joy", cues, "face")


def test_clip_control_scores_accuracy_and_the_changed_cue_per_kind():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from clip_control import score
    ds = make_clip_split("test", 6, seed=0)
    labels = [s.label for s in ds[:3]] + [None, None, None]
    r = score(ds, labels)
    assert r["all"] == {"n": 6, "accuracy": 50.0, "changed_cue": 50.0}, "three right answers, three without a label"
    assert sum(v["n"] for k, v in r.items() if k != "all") == 6


def test_a_longer_split_starts_with_the_shorter_one():
    short, long_ = make_clip_split("test", 10, seed=4), make_clip_split("test", 50, seed=4)
    assert [(s.id, s.label, s.metadata["changed"], s.image.key) for s in short] == \
        [(s.id, s.label, s.metadata["changed"], s.image.key) for s in long_[:10]]
