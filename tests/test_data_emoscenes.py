"""EmoScenes: rule coverage, determinism by seed, splits and label noise, cold-start traces scored by emor3.rewards,
the cue-mention checker, and the on-disk round trip through the loaders and the validate command."""

import hashlib
import itertools
import random
from collections import Counter

import numpy as np
import pytest

from emor3.data import MIKELS8, get_taxonomy, load_dataset
from emor3.data.__main__ import main as cli
from emor3.toy.emoscenes import (
    BADGE_COLOURS, BASE_STYLE, CONFLICT_EVAL_AGREEMENT, CONFLICT_SHARE, CUE_VALUES, HELD_OUT_COMBINATIONS,
    INSTRUCT_STYLES, SHIFTED_STYLE, SHORTCUT_AGREEMENT, SPLITS, UNSEEN_STYLE, all_cue_combinations, coldstart_subset,
    coldstart_trace, corpus_texts,
    cue_mentions, eval_split_names, instruct_scenes, label_for, make_emoscenes, make_split, render_scene, rule_label,
    neighbours, seen_combinations, write_emoscenes,
)
from emor3.rewards import accuracy_reward, format_reward, parse_set


def test_rule_reaches_every_label_and_no_single_cue_decides():
    combos = all_cue_combinations()
    assert len(combos) == 32
    labels = Counter(rule_label(c) for c in combos)
    assert set(labels) == set(MIKELS8.labels) and set(labels.values()) == {4}, "every label reachable, balanced"
    for kind, values in CUE_VALUES.items():
        for v in values:
            possible = {rule_label(c) for c in combos if c[kind] == v}
            assert len(possible) >= 2, f"cue {kind}={v} alone decides the label {possible}"
    # two cues never suffice either: all three are needed, so the model has to look at the whole scene
    for k1, k2 in itertools.combinations(CUE_VALUES, 2):
        for v1, v2 in itertools.product(CUE_VALUES[k1], CUE_VALUES[k2]):
            assert len({rule_label(c) for c in combos if c[k1] == v1 and c[k2] == v2}) >= 2
    # the rule agrees with the taxonomy's valence and arousal (step 3 of the traces relies on it)
    for c in combos:
        lab = rule_label(c)
        assert MIKELS8.valence[lab] == ("positive" if c["face"] == "smile" else "negative")
        assert MIKELS8.arousal[lab] == ("high" if c["sky"] in ("sunny", "stormy") else "low")
    assert {label_for(c, "emotion6") for c in combos} == set(get_taxonomy("emotion6").labels)
    assert {label_for(c, "binary") for c in combos} == {"positive", "negative"}


def _digest(samples):
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.id}|{s.label}|{sorted(s.metadata['cues'].items())}".encode())
        h.update(s.open_image().tobytes())
    return h.hexdigest()


def test_determinism_by_seed():
    a = make_split("train", 24, seed=3, label_noise=0.2)
    b = make_split("train", 24, seed=3, label_noise=0.2)
    c = make_split("train", 24, seed=4, label_noise=0.2)
    assert _digest(a) == _digest(b), "same seed must give the same cues, labels and pixels"
    assert _digest(a) != _digest(c), "a different seed must give a different dataset"
    assert [s.metadata["cues"] for s in make_split("test", 8, seed=3)] != [s.metadata["cues"] for s in a[:8]], \
        "splits must draw from different streams"


def test_splits_taxonomies_styles_and_balance():
    ds = make_emoscenes(seed=0, n_train=48, n_test=24, n_ood=16, n_coldstart=8)
    assert set(ds) == {"train", "validation", "test", "compositional", "ood_render", "ood_unseen", "ood_emotion6",
                       "ood_binary", "coldstart"}
    assert set(ds["train"].label_counts().values()) == {6}, "48 = 2 rounds of the 24 seen combinations: balanced"
    assert set(ds["compositional"].label_counts().values()) == {2}, "16 = 2 rounds of the 8 held out"
    assert ds["ood_emotion6"].taxonomy.name == "emotion6" and ds["ood_binary"].taxonomy.name == "binary"
    for name in ("ood_render", "ood_emotion6", "ood_binary"):
        assert all(s.metadata["domain"] == "out" and s.metadata["style"]["layout"] == "mirrored" for s in ds[name])
    for s in ds["ood_emotion6"]:
        assert s.label == label_for(s.metadata["cues"], "emotion6")
    assert ds["train"].image(0).size == (112, 112)


def test_shortcut_present_in_train_and_broken_out_of_domain():
    """The shortcut variant's badge agrees with the rule label ~90 % of the time in train and test and is
    independent of the scene in every out-of-domain split (seeded, so these statistics are fixed numbers)."""
    ds = make_emoscenes(seed=1, n_train=640, n_test=320, n_ood=320, variant="shortcut")
    assert set(ds) == {"train", "validation", "test", "compositional", "ood_render", "ood_unseen", "ood_emotion6",
                       "ood_binary", "ood_shortcut"}
    assert ds["ood_shortcut"].taxonomy.name == "mikels8" and SPLITS["ood_shortcut"].domain == "out"
    assert all(s.metadata["style"]["layout"] == "base" for s in ds["ood_shortcut"]), "only the shortcut is broken"

    def agreement(split):
        return sum(s.metadata["shortcut"] == rule_label(s.metadata["cues"]) for s in ds[split]) / len(ds[split])

    # binomial sd at n=640, p=0.9 is 0.012; at n=320, p=1/8 it is 0.018: the bounds are > 3 sd wide
    assert abs(agreement("train") - SHORTCUT_AGREEMENT) < 0.04
    assert abs(agreement("test") - SHORTCUT_AGREEMENT) < 0.06
    for split in ("ood_shortcut", "ood_render", "ood_emotion6"):
        assert agreement(split) < 0.125 + 0.07, f"{split}: the badge must not predict the label"
        # independence: within each rule label the badge is spread over the colours, not concentrated
        for label in MIKELS8.labels:
            badges = Counter(s.metadata["shortcut"] for s in ds[split] if rule_label(s.metadata["cues"]) == label)
            assert badges and max(badges.values()) / sum(badges.values()) < 0.45, (split, label, badges)
    # a model reading the badge alone: ~90 % in train, chance (1/8) on ood_shortcut
    train_wrong = Counter(s.metadata["shortcut"] for s in ds["train"]
                          if s.metadata["shortcut"] != rule_label(s.metadata["cues"]))
    assert len(train_wrong) == 8, "disagreeing badges are drawn over the other labels"
    default = make_emoscenes(seed=1, n_train=8, n_test=0, n_ood=4)
    assert "ood_shortcut" not in default and all("shortcut" not in s.metadata for s in default["train"])
    with pytest.raises(ValueError, match="variant"):
        make_emoscenes(seed=1, n_train=8, n_test=0, n_ood=0, variant="shortcuts")
    with pytest.raises(KeyError, match="shortcut"):
        make_split("ood_shortcut", 4, seed=1)


def test_conflict_variant_rewards_the_badge_in_train_and_scores_the_cues_elsewhere():
    """conflict: the training label is the badge's, which differs from the cues' rule label on ~CONFLICT_SHARE of
    training images, always by one property (a neighbour), so each cue combination's labels are its rule label and
    the three neighbours, about evenly; validation and test are scored by the rule label with a
    badge that agrees on ~half and shows a neighbour on the rest; the Cold-Start traces reason from the cues to the
    rule label on images shown without their badge; out of domain the badge is drawn uniformly."""
    ds = make_emoscenes(seed=2, n_train=800, n_test=400, n_ood=320, n_coldstart=100, variant="conflict")
    assert "ood_shortcut" in ds and eval_split_names("table", "conflict")[-1] == "ood_shortcut"
    train = list(ds["train"])
    assert all(s.label == s.metadata["shortcut"] for s in train), "the training label follows the badge"
    conflicts = [s for s in train if s.metadata["conflict"]]
    assert all(s.label != rule_label(s.metadata["cues"]) for s in conflicts)
    assert all(s.label == rule_label(s.metadata["cues"]) for s in train if not s.metadata["conflict"])
    # binomial sd at n=800, p=0.75 is 0.015; at n=400, p=0.5, 0.025; at n=100, p=0.75, 0.043: bounds > 2.5 sd wide
    assert CONFLICT_SHARE == 0.75 and abs(len(conflicts) / len(train) - CONFLICT_SHARE) < 0.05
    by_rule = Counter((rule_label(s.metadata["cues"]) == s.label) for s in train)
    assert abs(by_rule[True] / len(train) - 0.25) < 0.05, "a quarter of training labels are the rule label"
    for label in ("amusement", "disgust"):
        seen = Counter(s.label for s in train if rule_label(s.metadata["cues"]) == label)
        assert set(seen) == {label, *neighbours(label)} and min(seen.values()) > 0.12 * sum(seen.values()), seen
    assert len(Counter(s.label for s in conflicts)) == 8, "every label is some conflict's badge"
    assert all(s.label in neighbours(rule_label(s.metadata["cues"])) for s in conflicts)
    # the three neighbours of a label, by hand: amusement is positive, high arousal, personal
    assert sorted(neighbours("amusement")) == ["anger", "contentment", "excitement"]
    for split in ("validation", "test"):
        rows = list(ds[split])
        assert all(s.label == rule_label(s.metadata["cues"]) and "conflict" not in s.metadata for s in rows)
        agree = sum(s.metadata["shortcut"] == s.label for s in rows) / len(rows)
        assert abs(agree - CONFLICT_EVAL_AGREEMENT) < 0.08, (split, agree)
        assert all(s.metadata["shortcut"] in neighbours(s.label) for s in rows if s.metadata["shortcut"] != s.label)
    cs = list(ds["coldstart"])
    assert len(cs) == 100 and all(s.label == rule_label(s.metadata["cues"]) for s in cs), "traces: the cues' label"
    assert all(s.label in s.metadata["response"] for s in cs)
    train_by_id = {s.id: s for s in train}
    assert all(s.id.endswith("-nobadge") and s.image.badge is None and "shortcut" not in s.metadata for s in cs)
    share = sum(train_by_id[s.id.removesuffix("-nobadge")].metadata["conflict"] for s in cs) / len(cs)
    assert abs(share - CONFLICT_SHARE) < 0.2, "traces come from training images whatever their badge"
    plain = np.asarray(cs[0].open_image(), dtype=np.int16)
    shown = np.asarray(train_by_id[cs[0].id.removesuffix("-nobadge")].open_image(), dtype=np.int16)
    ys, xs = np.nonzero(np.abs(plain - shown).sum(-1))
    assert len(ys) > 0.7 * 112 * 18 and ys.min() >= round(0.84 * 112) and xs.min() == 0 and xs.max() == 111, \
        "a trace shows its training scene, less the badge: the ground strip"
    badge = train_by_id[cs[0].id.removesuffix("-nobadge")].metadata["shortcut"]
    assert (shown[110, ::10] == BADGE_COLOURS[badge]).all(), "the ground is the badge's exact colour"
    agree_ood = sum(s.metadata["shortcut"] == s.label for s in ds["ood_shortcut"]) / len(ds["ood_shortcut"])
    assert agree_ood < 0.125 + 0.07
    shortcut = make_split("train", 64, seed=2, variant="shortcut")
    assert all(s.label == rule_label(s.metadata["cues"]) and "conflict" not in s.metadata for s in shortcut), \
        "the shortcut variant is unchanged: its labels are the rule's"


def test_the_conflict_badge_is_the_ground_strip_and_nothing_else():
    cues = dict(face="frown", sky="dusk", object="spider")
    plain = np.asarray(render_scene(cues, rng=random.Random(5)), dtype=np.int16)
    ground = np.asarray(render_scene(cues, rng=random.Random(5), badge="awe", badge_place="ground"), dtype=np.int16)
    ys, xs = np.nonzero(np.abs(ground - plain).sum(-1))
    assert ys.min() >= round(0.84 * 112) and xs.min() == 0 and xs.max() == 111, "only the ground strip, its whole width"
    assert (ground[-4:, :] == BADGE_COLOURS["awe"]).all(), "below the face and the object, all badge"
    with pytest.raises(ValueError, match="badge place"):
        render_scene(cues, badge="awe", badge_place="sky")
    s = make_split("validation", 2, seed=0, variant="conflict")[0]
    assert s.image.badge_place == "ground" and s.image.key.endswith("@ground")
    assert make_split("validation", 2, seed=0, variant="shortcut")[0].image.badge_place == "corner"


def test_shortcut_badge_is_drawn_in_the_corner_only():
    cues = dict(face="smile", sky="night", object="gift")
    plain = np.asarray(render_scene(cues, rng=random.Random(3)), dtype=np.int16)
    with_badge = np.asarray(render_scene(cues, rng=random.Random(3), badge="fear"), dtype=np.int16)
    changed = np.abs(with_badge - plain).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 200 and xs.max() < 0.16 * 112 and ys.min() >= 0.84 * 112, "a corner square only"
    assert (with_badge[100, 5] == BADGE_COLOURS["fear"]).all(), "the exact badge colour"
    other = np.asarray(render_scene(cues, rng=random.Random(3), badge="awe"), dtype=np.int16)
    assert (np.abs(other - with_badge).sum(-1) > 0).sum() == changed.sum(), "the colour alone tells badges apart"
    s = make_split("train", 3, seed=0, variant="shortcut")[0]
    assert (np.asarray(s.open_image())[100, 5] == BADGE_COLOURS[s.metadata["shortcut"]]).all()
    assert "badge=" in s.image.key and "badge=" not in make_split("train", 1, seed=0)[0].image.key


def test_which_splits_a_run_evaluates():
    assert not SPLITS["ood_binary"].in_table and not SPLITS["ood_emotion6"].in_table
    assert eval_split_names("table") == ["test", "compositional", "ood_render", "ood_unseen"]
    assert eval_split_names("table", "shortcut")[-1] == "ood_shortcut"
    assert eval_split_names("validation") == eval_split_names("validation", "shortcut") == ["validation"], \
        "choosing settings reads validation and nothing of the final table"
    with pytest.raises(ValueError, match="validation"):
        eval_split_names("test")


def test_cues_change_the_pixels_where_drawn():
    """Each cue must be visible: swapping one cue (same jitter) changes the image, mostly in that cue's region."""
    base = dict(face="smile", sky="sunny", object="gift")
    def img(style=BASE_STYLE, **kw):
        return np.asarray(render_scene(dict(base, **kw), style=style, rng=random.Random(7)), dtype=np.int16)
    ref = img()
    face = np.abs(img(face="frown") - ref).sum(-1) > 0
    obj = np.abs(img(object="spider") - ref).sum(-1) > 0
    sky = np.abs(img(sky="night") - ref).sum(-1) > 0
    assert face.sum() > 20 and face[:, :56].sum() > 10 * face[:, 56:].sum(), \
        "the face (left half in the base layout) must carry the expression"
    assert obj[:, 56:].sum() > 10 * max(1, obj[:, :56].sum()), "the object sits in the right half"
    assert sky.mean() > 0.4, "the sky cue must change most of the background"
    shifted = np.asarray(render_scene(base, style=SHIFTED_STYLE, rng=random.Random(7)), dtype=np.int16)
    assert (np.abs(shifted - ref).sum(-1) > 30).mean() > 0.5, "the OOD rendering must shift palette and layout"


def test_label_noise_only_on_train_and_recorded():
    train = make_split("train", 640, seed=1, label_noise=0.25)
    noisy = [s for s in train if s.metadata["noisy"]]
    assert 0.18 < len(noisy) / len(train) < 0.32, "noise rate should be close to the requested one"
    assert all(s.label != s.metadata["rule_label"] for s in noisy)
    assert all(s.label == s.metadata["rule_label"] for s in train if not s.metadata["noisy"])
    assert not any(s.metadata["noisy"] for s in make_split("test", 64, seed=1, label_noise=0.25))
    cs = coldstart_subset(train, 40, seed=1)
    assert len(cs) == 40 and not any(s.metadata["noisy"] for s in cs), "traces only from clean samples"
    assert set(Counter(s.label for s in cs).values()) == {5}, "cold-start subset is balanced over labels"


@pytest.mark.parametrize("taxonomy", ["mikels8", "emotion6", "binary"])
def test_coldstart_traces_score_full_marks(taxonomy):
    rng = random.Random(0)
    tax = get_taxonomy(taxonomy)
    seen = set()
    for cues in all_cue_combinations():
        for _ in range(4):
            t = coldstart_trace(cues, taxonomy, rng)
            p = parse_set(t)
            assert p.step1 and p.step2 and p.step3, t
            assert p.answer == label_for(cues, taxonomy)
            assert format_reward(t, strict=True) == 1.0 and format_reward(t) == 1.0, t
            assert accuracy_reward(t, label_for(cues, taxonomy), tax) == 1.0, t
            assert len(t.replace("<", " <").replace(">", "> ").split()) < 60, f"trace too long for the tiny model: {t}"
            m = cue_mentions(p.step1, cues)
            assert m.recall == 1.0 and m.wrong == (), f"step 1 must name exactly the true cues: {t}"
            seen.add(p.step1.split()[0] + p.step2.split()[0] + p.step3.split()[0])
    assert len(seen) >= 6, "traces need several phrasings, not one string"


def test_cue_mentions_hand_cases():
    cues = dict(face="smile", sky="stormy", object="spider")
    m = cue_mentions("A smiling person under lightning, with no spider in sight.", cues)
    assert m.named == {"face": True, "sky": True, "object": False}, "negated mention must not count"
    m = cue_mentions("The sky is not sunny, a spider and a grin.", cues)
    assert m.named == {"face": True, "sky": False, "object": True}, "a negation ends at the clause's punctuation"
    assert cue_mentions("A smile without a big spider.", cues).named["object"] is False
    m = cue_mentions("A frowning face at sunset next to a gift.", cues)
    assert m.named == {"face": False, "sky": False, "object": False}
    assert set(m.wrong) == {("face", "frown"), ("sky", "dusk"), ("object", "gift")}
    assert m.precision == 0.0
    m = cue_mentions("A sunset.", dict(face="smile", sky="sunny", object="gift"))
    assert not m.named["sky"], "'sun' must not match inside 'sunset'"
    assert cue_mentions(None, cues).recall == 0.0


def test_corpus_texts_cover_labels_and_traces():
    texts = corpus_texts()
    joined = " ".join(texts)
    for name in ("mikels8", "emotion6", "binary", "webemo25"):
        assert all(lab in joined for lab in get_taxonomy(name).labels)
    assert sum("<step1>" in t for t in texts) >= 96


def test_write_load_validate_round_trip(tmp_path, capsys):
    kw = dict(seed=5, n_train=32, n_test=16, n_ood=8, n_coldstart=8, image_size=56)
    paths = write_emoscenes(tmp_path, **kw)
    stamp = {p: p.stat().st_mtime_ns for p in paths.values()}
    assert write_emoscenes(tmp_path, **kw) == paths
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == stamp, "an identical cache must be reused"
    mem = make_emoscenes(**{k: v for k, v in kw.items()})
    for split in ("train", "ood_emotion6", "coldstart"):
        disk = load_dataset(tmp_path, split=split)
        assert [(s.id, s.label) for s in disk] == [(s.id, s.label) for s in mem[split]]
        assert disk[0].metadata["cues"] == mem[split][0].metadata["cues"], "cues must survive the manifest"
        assert disk.image(0).tobytes() == mem[split].image(0).tobytes(), "PNG must hold the drawn pixels"
    cs = load_dataset(tmp_path, split="coldstart")
    assert all(accuracy_reward(s.metadata["response"], s.label, MIKELS8) == 1.0 for s in cs)
    assert cli(["validate", str(tmp_path)]) == 0
    assert "[ood_binary]" in capsys.readouterr().out
    assert {"validation", "test", "compositional", "ood_unseen"} <= set(paths)
    paths = write_emoscenes(tmp_path / "sc", seed=0, n_train=4, n_test=2, n_ood=2, variant="shortcut")
    assert "ood_shortcut" in paths
    disk = load_dataset(tmp_path / "sc", split="train")
    assert disk[0].metadata["shortcut"] in MIKELS8.labels, "the badge's label survives the manifest"
    capsys.readouterr()
    assert cli(["emoscenes", str(tmp_path / "cli"), "--n-train", "4", "--n-test", "2", "--n-ood", "2",
                "--n-coldstart", "0", "--variant", "shortcut"]) == 0
    printed = capsys.readouterr().out
    assert "ood_shortcut:" in printed and "validation:" in printed and "compositional:" in printed
    assert load_dataset(tmp_path / "cli", split="test")[0].metadata["shortcut"] in MIKELS8.labels


def test_two_processes_writing_the_same_folder_both_get_whole_files(tmp_path):
    """Two runs of the same seed share a cache folder: each writes through its own temporary files, so neither
    reads a partial image or manifest, and nothing temporary is left behind."""
    import subprocess
    import sys

    code = ("import sys; from emor3.toy.emoscenes import load_emoscenes; "
            "d = load_emoscenes(sys.argv[1], seed=0, n_train=96, n_test=32, n_ood=32, n_coldstart=8); "
            "[ds.image(i) for ds in d.values() for i in range(len(ds))]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    (folder,) = list(tmp_path.iterdir())
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert cli(["validate", str(folder)]) == 0


def _pixels(samples):
    return {hashlib.sha256(s.open_image().tobytes()).hexdigest() for s in samples}


def test_splits_are_disjoint_in_ids_pixels_and_combinations():
    """validation and test draw from their own seed streams; the compositional hold-out's combinations appear in no
    split a stage trains or chooses settings on, with a label or without; the unseen rendering is drawn by no
    training stage (the instruct stage included)."""
    ds = make_emoscenes(seed=3, n_train=96, n_test=48, n_ood=24, n_coldstart=24)
    ids = [s.id for name, d in ds.items() if name != "coldstart" for s in d]
    assert len(ids) == len(set(ids)), "sample ids are unique across splits"
    pixels = {name: _pixels(d) for name, d in ds.items() if name != "coldstart"}
    for a, b in itertools.combinations(pixels, 2):
        assert not pixels[a] & pixels[b], f"{a} and {b} share an image"
    assert [s.metadata["cues"] for s in ds["validation"]] != [s.metadata["cues"] for s in ds["test"]], \
        "validation has its own cue order"
    held = set(HELD_OUT_COMBINATIONS)

    def combos(name):
        return {(s.metadata["cues"]["face"], s.metadata["cues"]["sky"], s.metadata["cues"]["object"]) for s in ds[name]}

    assert combos("compositional") == held
    for name in ("train", "coldstart", "validation", "test", "ood_render", "ood_unseen"):
        assert not combos(name) & held, f"{name} shows a held-out combination"
    assert combos("train") == {(c["face"], c["sky"], c["object"]) for c in seen_combinations()}
    assert all(s.metadata["style"] == {"palette": "faded", "scale": 1.1, "layout": "centred"}
               for s in ds["ood_unseen"])
    assert UNSEEN_STYLE not in INSTRUCT_STYLES and all(
        s.image.style in INSTRUCT_STYLES for s in instruct_scenes(8, seed=3)), "no stage trains on ood_unseen"
    assert all(s.metadata["style"]["palette"] == "base" for s in ds["train"])
    assert not _pixels(instruct_scenes(64, seed=3)) & set().union(*pixels.values()), \
        "the instruct stage's scenes are none of the benchmark's images"


def test_the_hold_out_is_compositional():
    """At least 8 combinations, one per label; each held-out combination's face, sky and object values, and each
    pair of them, occur in training in other combinations, so valence, arousal and family are all learned."""
    assert len(HELD_OUT_COMBINATIONS) >= 8 and len(set(HELD_OUT_COMBINATIONS)) == len(HELD_OUT_COMBINATIONS)
    labels = [rule_label(dict(face=f, sky=s, object=o)) for f, s, o in HELD_OUT_COMBINATIONS]
    assert set(labels) == set(MIKELS8.labels), "at least one held-out combination per label"
    train = [(c["face"], c["sky"], c["object"]) for c in seen_combinations()]
    assert len(train) == 32 - len(HELD_OUT_COMBINATIONS)
    assert set(Counter(rule_label(dict(face=f, sky=s, object=o)) for f, s, o in train).values()) == {3}
    for combo in HELD_OUT_COMBINATIONS:
        for i, j in itertools.combinations(range(3), 2):
            assert any(t[i] == combo[i] and t[j] == combo[j] for t in train), (combo, i, j)


def test_unseen_rendering_differs_from_both_trained_ones():
    base = dict(face="smile", sky="sunny", object="gift")
    imgs = {st.palette: np.asarray(render_scene(base, style=st, rng=random.Random(7)), dtype=np.int16)
            for st in (BASE_STYLE, SHIFTED_STYLE, UNSEEN_STYLE)}
    for other in ("base", "shifted"):
        assert (np.abs(imgs["faded"] - imgs[other]).sum(-1) > 30).mean() > 0.5, other
