"""EmoScenes clips: the EmoScenes rule over short clips in which one cue shows its value only for a while, so that
no single frame gives the label.

Every clip has 4, 6 or 8 frames (`FRAME_COUNTS`, at `FPS` frames per second) of one EmoScenes scene (the same face,
sky and object cues, rule and label as `emor3.toy.emoscenes`). Two cues are drawn in every frame. The third, the
clip's *changed* cue (face, sky or object, balanced), is in a neutral state in the first and the last frame and
shows its value only during an event in the middle (`event` = [start, stop) frames, 1 <= start < stop <= F - 1,
at least half the clip):
- face: a neutral face (straight mouth) turns to a smile or a frown, then back;
- sky: a plain overcast sky clears to the sunny, stormy, dusk or night sky, then clouds over again;
- object: the object appears, then goes.
The label follows the cues' values as in the image benchmark (valence from the face, arousal from the sky, family
from the object), so the changed cue's property, hence half of the label, is in the middle frames only: the first
frame and the last frame each leave the two labels that differ in that property equally likely (tests check it over
every combination). The neutral states (`NEUTRAL`) are none of the cue values.

Splits (`SPLITS`) follow the image benchmark's rules, with their own seed streams (``emoscenes-clips:<seed>:<split>``
in every seed string, so no clip shares an id or a frame with another split or with the image benchmark): `train`
(label noise as there), `validation`, sealed `test`, `compositional` (the 8 `HELD_OUT_COMBINATIONS`), `ood_render`
(the shifted rendering) and `ood_unseen` (`UNSEEN_STYLE`). The final table (`eval_split_names`) is test (A^I) and
compositional, ood_render and ood_unseen (A^O).

Single-frame controls (`CONTROLS`): `test_first` and `test_last` are the test clips with every frame replaced by the
clip's first (last) frame, so prompt and token count stay those of the clip and only the change over time is
gone. A policy given them reads two cues and sees the changed one neutral: it can at best guess between two labels.
`frozen(samples, which)` builds such a view of any split (to train a single-frame baseline).

On disk (`write_emoscenes_clips`, `python -m emor3.data emoscenes DIR --variant clips`): `<split>.jsonl` manifests
whose rows name the clip as a list of PNG frames (`frames`, relative to the folder) and its `fps`, beside the label
and the metadata (`cues`, `changed`, `event`, `frames_in_clip`, ...); the control rows list one frame file repeated.
Frames are `clips/<split>/<id>/<k>.png`; `emor3.data.load_dataset` reads the folder like any manifest folder.

Cold-start traces (`clip_trace`) describe the change in step 1 ("a neutral face breaks into a smile for a moment"),
then steps 2 and 3 as the image traces do.

Determinism: a clip's layout and nuisance jitter come from one `random.Random` seeded with its seed string, drawn
once for all its frames (the stars of a night sky from a second one), so frames differ only in the changed cue and
the same seed gives the same PNG bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from emor3.data.dataset import EmotionDataset, LoadReport, Sample, write_atomic
from emor3.data.loaders import write_manifest
from emor3.toy.emoscenes import (AROUSAL_OF_SKY, FACE_WORDS, FEELINGS, LAYOUTS, RULE_TABLE, SKY_WORDS, STEP2,
                                  STEP3, VALENCE_OF_FACE, RenderStyle, cue_rounds, draw_cue, jittered_palette,
                                  label_for, rule_label, written_before)
from emor3.toy.emoscenes import SPLITS as IMAGE_SPLITS
from emor3.data.taxonomy import get_taxonomy
from emor3.models.clips import Clip

VERSION = 2  # bump when drawing, splits or rule change, so cached folders are regenerated
FPS = 2.0  # frames per second the clips are written at
FRAME_COUNTS = (4, 6, 8)
CHANGING = ("face", "sky", "object")
NEUTRAL = {"face": "neutral", "sky": "overcast", "object": "none"}  # the changed cue outside its event
# the image benchmark's in-table and selection splits, drawn as clips
SPLITS = {name: IMAGE_SPLITS[name] for name in ("train", "validation", "test", "compositional", "ood_render",
                                                "ood_unseen")}
CONTROLS = {"test_first": ("test", "first"), "test_last": ("test", "last")}


# ---------------------------------------------------------------------------------------------------- one clip


def event_window(n_frames: int, rng: random.Random) -> tuple[int, int]:
    """[start, stop) of the event: at least half the clip, never the first or the last frame."""
    length = rng.randint(-(-n_frames // 2), n_frames - 2)
    start = rng.randint(1, n_frames - 1 - length)
    return start, start + length


def frame_states(cues: dict[str, str], changed: str, n_frames: int, event: tuple[int, int]) -> list[dict[str, str]]:
    """Per frame, the state of each cue: its value, or for the changed cue outside the event its neutral state."""
    if changed not in CHANGING:
        raise ValueError(f"unknown changed cue {changed!r}; known: {CHANGING}")
    a, b = event
    if not 1 <= a < b <= n_frames - 1:
        raise ValueError(f"event {event} must lie inside frames 1..{n_frames - 2}")
    return [dict(cues, **({} if a <= k < b else {changed: NEUTRAL[changed]})) for k in range(n_frames)]


def _overcast(pal: dict) -> tuple[int, int, int]:
    """A plain grey sky, lighter than the storm: the mean grey of the sunny and stormy colours, raised by 30."""
    g = min(255, round(sum(pal["sunny"]) / 6 + sum(pal["stormy"]) / 6) + 30)
    return (g, g, g)


def _draw_neutral_face(d: ImageDraw.ImageDraw, x: float, y: float, r: float, S: int, pal: dict) -> None:
    """The face disc and eyes as EmoScenes draws them, with a straight mouth and no brows: neither smile nor frown."""
    d.ellipse([x - r, y - r, x + r, y + r], fill=pal["skin"], outline=pal["ink"], width=max(1, round(S / 56)))
    e = 0.12 * r
    for ex in (x - 0.38 * r, x + 0.38 * r):
        d.ellipse([ex - e, y - 0.3 * r - e, ex + e, y - 0.3 * r + e], fill=pal["ink"])
    d.line([(x - 0.45 * r, y + 0.45 * r), (x + 0.45 * r, y + 0.45 * r)], fill=pal["ink"], width=max(1, round(S / 36)))


@dataclass(frozen=True)
class FrameLayout:
    """Where and in which colours a clip's frames draw their cues (one draw per clip, shared by its frames)."""

    pal: dict
    sky: tuple[float, float]
    face: tuple[float, float, float]  # x, y, radius
    object: tuple[float, float, float]
    stars_seed: float

    @classmethod
    def draw(cls, size: int, style: RenderStyle, rng: random.Random) -> "FrameLayout":
        S = size
        pal = jittered_palette(style, rng)
        sky_x, face_x, object_x = LAYOUTS[style.layout]
        sky = (sky_x * S + rng.uniform(-0.04, 0.04) * S, 0.19 * S + rng.uniform(-0.03, 0.03) * S)
        k = style.scale * rng.uniform(0.92, 1.08)
        fx, ox = face_x * S + rng.uniform(-0.04, 0.04) * S, object_x * S + rng.uniform(-0.04, 0.04) * S
        fy, oy = 0.62 * S + rng.uniform(-0.04, 0.04) * S, 0.62 * S + rng.uniform(-0.04, 0.04) * S
        return cls(pal, sky, (fx, fy, 0.2 * S * k), (ox, oy, 0.18 * S * k), rng.random())


def render_frame(state: dict[str, str], layout: FrameLayout, size: int) -> Image.Image:
    """One frame (RGB, size x size) of the cue states `state` (values or `NEUTRAL` states) at `layout`."""
    S, pal = size, layout.pal
    sky = state["sky"]
    ground = {"dusk": pal["dusk_top"], "overcast": _overcast(pal)}.get(sky, pal.get(sky))
    img = Image.new("RGB", (S, S), ground)
    d = ImageDraw.Draw(img)
    if sky == "dusk":  # vertical gradient, drawn as rows, as EmoScenes does
        top, bot = pal["dusk_top"], pal["dusk_bottom"]
        for y in range(S):
            t = y / max(1, S - 1)
            d.line([(0, y), (S, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bot)))
    if sky != "overcast":
        draw_cue(d, "sky", sky, *layout.sky, 0.0, S, pal, random.Random(layout.stars_seed))
    d.rectangle([0, round(0.84 * S), S, S], fill=pal["ground"])
    if state["face"] == "neutral":
        _draw_neutral_face(d, *layout.face, S, pal)
    else:
        draw_cue(d, "face", state["face"], *layout.face, S, pal, random.Random(0))
    if state["object"] != "none":
        draw_cue(d, "object", state["object"], *layout.object, S, pal, random.Random(0))
    return img


@dataclass(frozen=True)
class SceneClip:
    """An EmoScenes clip drawn on demand (a clip source, `emor3.data.clip_source`): the same fields always give the
    same pixels. `hold` ("first" / "last"): every frame is that frame (a single-frame control)."""

    cues: tuple[tuple[str, str], ...]
    changed: str
    n_frames: int
    event: tuple[int, int]
    size: int
    style: RenderStyle
    seed: str
    hold: str | None = None
    fps: float = FPS

    @property
    def key(self) -> str:
        tail = "" if self.hold is None else f":hold={self.hold}"
        return (f"emoscenes-clips-v{VERSION}:{self.seed}:{self.size}:{self.style}:{self.changed}:{self.n_frames}:"
                f"{self.event}{tail}")

    def states(self) -> list[dict[str, str]]:
        return frame_states(dict(self.cues), self.changed, self.n_frames, self.event)

    def frames(self) -> list[Image.Image]:
        """The clip's frames (held ones repeated), drawn now."""
        layout = FrameLayout.draw(self.size, self.style, random.Random(self.seed))
        states = self.states()
        if self.hold is not None:
            states = [states[0 if self.hold == "first" else -1]] * self.n_frames
        return [render_frame(s, layout, self.size) for s in states]

    def probe(self) -> tuple[int, float, int, int]:
        """(frames, fps, height, width), without drawing."""
        return self.n_frames, self.fps, self.size, self.size

    def open_clip(self) -> Clip:
        frames = torch.stack([torch.from_numpy(np.asarray(f, dtype=np.uint8).copy()).permute(2, 0, 1)
                              for f in self.frames()])  # (F, 3, H, W)
        return Clip(frames, self.fps, f"<{self.key}>")


# ---------------------------------------------------------------------------------------------------- splits


def eval_split_names(which: str = "table") -> list[str]:
    """The splits a clip run evaluates: "table" (test, compositional, ood_render, ood_unseen) or "validation"."""
    if which == "validation":
        return [n for n, s in SPLITS.items() if s.selection]
    if which != "table":
        raise ValueError(f"unknown EmoScenes evaluation {which!r}; known: table, validation")
    return [n for n, s in SPLITS.items() if s.in_table]


def split_domain(name: str) -> str:
    """"in" or "out": which average of the table a split (or a control of one) counts towards."""
    return SPLITS[CONTROLS[name][0] if name in CONTROLS else name].domain


def make_clip_split(split: str, n: int, *, seed: int, image_size: int = 112, label_noise: float = 0.0) -> list[Sample]:
    """n clip samples of `split` (frames drawn lazily, `SceneClip`). label_noise applies to `train` only."""
    if split not in SPLITS:
        raise KeyError(f"unknown EmoScenes clip split {split!r}; known: {list(SPLITS)} (controls: "
                       f"{list(CONTROLS)}, built by make_emoscenes_clips)")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    spec = SPLITS[split]
    tax = get_taxonomy(spec.taxonomy)
    order = random.Random(f"emoscenes-clips:{seed}:{split}:order")
    cue_list = cue_rounds(n, order, spec.combos)
    # the changed cue in shuffled rounds of the three kinds, from its own stream: balanced, independent of the
    # combination, and a longer split starts with the shorter one
    krng = random.Random(f"emoscenes-clips:{seed}:{split}:changed")
    kinds = [k for _ in range(-(-n // len(CHANGING))) for k in krng.sample(CHANGING, len(CHANGING))][:n]
    samples = []
    for i, (cues, changed) in enumerate(zip(cue_list, kinds)):
        crng = random.Random(f"emoscenes-clips:{seed}:{split}:{i}:clip")
        n_frames = crng.choice(FRAME_COUNTS)
        event = event_window(n_frames, crng)
        truth = label_for(cues, tax.name)
        label, noisy = truth, False
        if spec.noisy and label_noise > 0:
            nrng = random.Random(f"emoscenes-clips:{seed}:{split}:{i}:noise")
            if nrng.random() < label_noise:
                label, noisy = nrng.choice([x for x in tax.labels if x != truth]), True
        clip = SceneClip(tuple(sorted(cues.items())), changed, n_frames, event, image_size, spec.style,
                         f"emoscenes-clips:{seed}:{split}:{i}")
        meta = {"cues": dict(cues), "changed": changed, "event": list(event), "frames_in_clip": n_frames,
                "rule_label": truth, "noisy": noisy, "split": split, "domain": spec.domain,
                "style": asdict(spec.style)}
        samples.append(Sample(f"emoscenes-clips-{split}-{i:05d}", clip, label, tax.name, meta))
    return samples


def frozen(samples: list[Sample], which: str) -> list[Sample]:
    """The single-frame control of clip samples: every frame replaced by the first ("first") or last ("last") one;
    ids get the suffix `-first` / `-last`, metadata `hold`."""
    if which not in ("first", "last"):
        raise ValueError(f"hold must be 'first' or 'last', got {which!r}")
    out = []
    for s in samples:
        clip = SceneClip(**{**{f: getattr(s.image, f) for f in SceneClip.__dataclass_fields__}, "hold": which})
        out.append(Sample(f"{s.id}-{which}", clip, s.label, s.taxonomy, dict(s.metadata, hold=which)))
    return out


# ---------------------------------------------------------------------------------------------------- traces

CHANGE_STEP1 = {
    "face": ("A face turns from neutral to {face_word} and back, under a {sky}, with a {object}.",
             "Under a {sky}, next to a {object}, a neutral face breaks into a {face_noun} for a moment."),
    "sky": ("A {face_word} face and a {object}; the grey sky turns into a {sky} for a while.",
            "The grey sky briefly becomes a {sky} above a {face_word} face and a {object}."),
    "object": ("A {face_word} face under a {sky}; a {object} appears for a moment.",
               "For a moment a {object} shows up beside a {face_word} face under a {sky}."),
}


def clip_trace(cues: dict[str, str], changed: str, taxonomy: str = "mikels8", rng: random.Random | None = None) -> str:
    """A SET reference response for a clip: step 1 names the three cues and the change, steps 2-3 as the image
    traces (`emor3.toy.emoscenes.coldstart_trace`)."""
    rng = rng or random.Random(0)
    label = label_for(cues, taxonomy)
    valence, arousal = VALENCE_OF_FACE[cues["face"]], AROUSAL_OF_SKY[cues["sky"]]
    fill = dict(face_word=FACE_WORDS[cues["face"]], face_noun=cues["face"], sky=SKY_WORDS[cues["sky"]],
                object=cues["object"], feeling=rng.choice(FEELINGS[label]), valence=valence,
                Valence=valence.capitalize(), arousal=arousal)
    s1 = rng.choice(CHANGE_STEP1[changed]).format(**fill)
    s2, s3 = (rng.choice(t).format(**fill) for t in (STEP2, STEP3))
    return f"<step1>{s1}</step1><step2>{s2}</step2><step3>{s3}</step3>\\boxed{{{label}}}"


def coldstart_clips(train: list[Sample], n: int, *, seed: int) -> list[Sample]:
    """n clean training clips, round-robin over labels, each with a SET reference `response` in metadata."""
    rng = random.Random(f"emoscenes-clips:{seed}:coldstart")
    queues: dict[str, list[Sample]] = {}
    for s in train:
        if not s.metadata.get("noisy"):
            queues.setdefault(s.label, []).append(s)
    order = [queues[k] for k in sorted(queues)]
    chosen: list[Sample] = []
    while len(chosen) < n and any(order):
        for q in order:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return [Sample(s.id, s.image, s.label, s.taxonomy,
                   dict(s.metadata, response=clip_trace(s.metadata["cues"], s.metadata["changed"], s.taxonomy, rng)))
            for s in chosen]


# ---------------------------------------------------------------------------------------------------- control

# the property each cue gives the label, and a Mikels label's three properties (the inverse of the rule's table)
PROPERTY_OF = {"face": 0, "sky": 1, "object": 2}
LABEL_PROPERTIES = {label: props for props, label in RULE_TABLE.items()}


def changed_cue_right(label: str | None, cues: dict[str, str], changed: str) -> bool:
    """Whether a predicted Mikels label has the property the changed cue gives the truth (valence for the face,
    arousal for the sky, family for the object); False without a label. Over clips whose other two cues are read
    right, chance is 50 %: an end frame leaves two labels that differ in exactly this property."""
    if label not in LABEL_PROPERTIES:
        return False
    k = PROPERTY_OF[changed]
    return LABEL_PROPERTIES[label][k] == LABEL_PROPERTIES[rule_label(cues)][k]


# ---------------------------------------------------------------------------------------------------- datasets


def split_sizes(n_train: int, n_test: int, n_ood: int) -> dict[str, int]:
    """Every split and control with its size: validation and the controls as many as test, out-of-domain n_ood."""
    n = {"train": n_train, "validation": n_test, "test": n_test}
    return {**{name: n.get(name, n_ood) for name in SPLITS}, **{c: n_test for c in CONTROLS}}


def make_emoscenes_clips(*, seed: int, n_train: int, n_test: int, n_ood: int, image_size: int = 112,
                         label_noise: float = 0.0, n_coldstart: int = 0) -> dict[str, EmotionDataset]:
    """Every split, the single-frame controls and (n_coldstart > 0) `coldstart`, in memory (frames drawn lazily)."""
    made: dict[str, list[Sample]] = {}
    for name, n in split_sizes(n_train, n_test, n_ood).items():
        if n > 0 and name in SPLITS:
            made[name] = make_clip_split(name, n, seed=seed, image_size=image_size, label_noise=label_noise)
    for name, (base, which) in CONTROLS.items():
        if base in made:
            made[name] = frozen(made[base], which)
    if n_coldstart > 0:
        if "train" not in made:
            raise ValueError("cold-start traces are drawn from the training split: n_train must be > 0")
        made["coldstart"] = coldstart_clips(made["train"], n_coldstart, seed=seed)
    return {name: EmotionDataset(samples, "mikels8", LoadReport(f"emoscenes-clips:{name}", "emoscenes-clips",
                                                                "mikels8"))
            for name, samples in made.items()}


def write_emoscenes_clips(out_dir: str | Path, *, seed: int, n_train: int, n_test: int, n_ood: int,
                          image_size: int = 112, label_noise: float = 0.0, n_coldstart: int = 0,
                          overwrite: bool = False) -> dict[str, Path]:
    """Write every split as `<split>.jsonl` + `clips/<split>/<id>/<k>.png`; returns the manifest paths. A folder
    already holding the same configuration (emoscenes_clips.json) is reused as is, unless overwrite."""
    out_dir = Path(out_dir)
    config = dict(version=VERSION, seed=seed, n_train=n_train, n_test=n_test, n_ood=n_ood, image_size=image_size,
                  label_noise=label_noise, n_coldstart=n_coldstart)
    stamp = out_dir / "emoscenes_clips.json"
    names = [s for s, n in dict(split_sizes(n_train, n_test, n_ood), coldstart=n_coldstart).items() if n > 0]
    paths = {s: out_dir / f"{s}.jsonl" for s in names}
    if written_before(stamp, config, paths, overwrite):
        return paths
    datasets = make_emoscenes_clips(seed=seed, n_train=n_train, n_test=n_test, n_ood=n_ood, image_size=image_size,
                                    label_noise=label_noise, n_coldstart=n_coldstart)
    written: dict[str, list[str]] = {}  # clip id -> its frame files
    for split in ("train", "validation", "test", "compositional", "ood_render", "ood_unseen"):
        for s in datasets[split].samples if split in datasets else []:
            folder = f"clips/{split}/{s.id}"
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
            files = []
            for k, frame in enumerate(s.image.frames()):
                rel = f"{folder}/{k}.png"
                write_atomic(out_dir / rel, lambda f, im=frame: im.save(f, format="PNG"))
                files.append(rel)
            written[s.id] = files
    for split, ds in datasets.items():
        rows = []
        for s in ds.samples:
            hold = s.metadata.get("hold")
            base = written[s.id[: -len(hold) - 1] if hold else s.id]
            frames = base if hold is None else [base[0] if hold == "first" else base[-1]] * len(base)
            rows.append({"id": s.id, "frames": frames, "fps": s.image.fps, "label": s.label, "taxonomy": s.taxonomy,
                         **s.metadata})
        write_manifest(paths[split], rows)
    write_atomic(stamp, lambda f: f.write(json.dumps(config, indent=1).encode()))
    return paths


def load_emoscenes_clips(cache_dir: str | Path, *, seed: int, n_train: int, n_test: int, n_ood: int,
                         image_size: int = 112, label_noise: float = 0.0, n_coldstart: int = 0,
                         **dataset_kw) -> dict[str, EmotionDataset]:
    """Generate (or reuse) EmoScenes clips under `cache_dir/clips-seed<seed>-...` and load every split from disk."""
    from emor3.data.loaders import load_manifest
    sub = Path(cache_dir) / (f"clips-seed{seed}-{image_size}px-n{n_train}-{n_test}-{n_ood}-{n_coldstart}"
                             f"-noise{label_noise}")
    paths = write_emoscenes_clips(sub, seed=seed, n_train=n_train, n_test=n_test, n_ood=n_ood, image_size=image_size,
                                  label_noise=label_noise, n_coldstart=n_coldstart)
    return {split: load_manifest(p, verify="exists", **dataset_kw) for split, p in paths.items()}
