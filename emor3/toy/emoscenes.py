"""EmoScenes: a synthetic emotion benchmark of pillow-drawn scenes whose label follows a rule over visible cues.

Every image shows three cues, drawn as large, high-contrast shapes so that a ~1-3M parameter ViT with 14 px patches
can learn them from a few hundred 112x112 images (8x8 patches, 16 merged tokens):
- face (the person's expression): smile | frown (a big face disc: a wide open grin, or a thin mouth line curving
  down under heavy brows);
- sky (environment and light): sunny (blue, sun with rays) | stormy (grey, cloud and lightning) |
  dusk (orange-to-purple gradient, red sun) | night (dark blue, crescent moon, stars);
- object: gift (box with ribbon) | heart | spider | flower.

The rule (Mikels' 8). Each cue sets one property; the label is the pair of properties plus the object's family:
    valence = positive if face == smile else negative
    arousal = high if sky in {sunny, stormy} else low            (bright or dramatic light vs. calm light)
    family  = personal if object in {gift, heart} else nature      (object in {spider, flower})
    label   = TABLE[valence, arousal, family]:
              positive/high: amusement (personal), excitement (nature)
              positive/low:  contentment (personal), awe (nature)
              negative/high: anger (personal), fear (nature)
              negative/low:  sadness (personal), disgust (nature)
So one cue alone leaves 4 labels possible, two cues leave 2, all three decide (tests check this over the whole
table); valence and arousal follow `emor3.data.taxonomy.MIKELS8`. Cues are drawn as a shuffled, repeated list of a
split's combinations (`cue_rounds`), so labels are balanced. With `label_noise` p, a training label is replaced with
prob. p by a uniformly drawn different label (metadata keeps `rule_label` and `noisy`); evaluation splits are clean.

Splits (`SPLITS`, version 4). Every split draws its cue order and its images from its own seed stream (the split's
name is in every seed string), so no two share an id or an image. Of the 32 combinations, 8 are held out
(`HELD_OUT_COMBINATIONS`, one per label; each of their face, sky and object values, and each pair of them, occurs in
training in other combinations); every split but `compositional` (and the two other-taxonomy splits) draws the
other 24.
- `train` (base rendering; the Cold-Start traces are drawn from it): what Cold-Start SFT and GRPO train on.
- `validation` (base rendering, as many images as test): the split settings are chosen on. A run evaluates it
  instead of the final table's splits with ``--data.emoscenes-eval validation``, and then reads no test image.
- `test` (base rendering, in-domain): sealed. Only the final tables read it: the table at the end of
  ``python -m emor3.grpo.train`` (its Cold-Start row is evaluated when GRPO starts, and selects nothing),
  ``python -m emor3.evaluate`` and ``benchmarks/ablation.py``.
- `compositional` (base rendering, out-of-domain): the 8 held-out combinations. A lookup of seen combinations
  cannot answer them; reasoning through valence, arousal and family (SET's step 3) can. The instruct stage shows
  these scenes, without labels (it draws every combination, to describe them and answer questions about cues).
- `ood_render` (Mikels' 8, shifted rendering): the palette (every colour), the size (0.8x) and the layout (mirrored:
  face right, object left, sky element top left) change. The instruct stage trains on this rendering (no label), so
  it tests whether the cue-to-label reasoning Cold-Start SFT and GRPO learn on the base rendering carries over to a
  rendering the model already perceives, not perception of an unseen one.
- `ood_unseen` (Mikels' 8, `UNSEEN_STYLE`): a rendering no stage trains on, the instruct stage included (washed-out
  colours, 1.1x shapes, the sky element centred): perception and reasoning both out of domain.
- `ood_emotion6` and `ood_binary` (shifted rendering, every combination, another taxonomy). Emotion6 labels come
  from the Mikels label (`MIKELS_TO_EMOTION6`, our choice: amusement, contentment and excitement -> joy; awe ->
  surprise; the four negative labels keep their names); binary labels are the valence.
The final table (`eval_split_names`) is test (A^I) and compositional, ood_render and ood_unseen (A^O). What the
tokenizer of the tiny model is trained on (`corpus_texts`: traces of all 32 combinations) is text for its BPE
merges, never a training example of the model.

What the out-of-domain taxonomies can measure. The cold-start traces all answer in Mikels' 8, so a model trained
here has only ever boxed those eight words, after a prompt that only ever listed them. Binary shares none
("positive" / "negative" appear only inside step 3): a model trained from scratch on 100 traces boxes a Mikels word
there every time, 0 % whatever it learned. Emotion6 shares four (anger, disgust, fear, sadness), but the tiny model
does not carry its SET reasoning over to a prompt with another label list: at the default settings the Cold-Start
checkpoints of seeds 0 and 2 answered 18.75 % and 11.50 % of `ood_emotion6` in the SET format, and their EMO-R3
policies 26.25 % and 8.25 % (benchmarks/RESULTS.md, "ablation"), so the split measures how the model breaks on an
unseen prompt, not emotion transfer (measured with EmoScenes v3). Both are generated and written to disk but are not
in the evaluation table (`SplitSpec.in_table`).

Variants (`VARIANTS`, `--data.emoscenes-variant`). `default` is the above. `shortcut` adds a coloured badge in the
bottom-left corner whose colour is one of eight (`BADGE_COLOURS`, one per Mikels label): in `train`, `validation`
and `test` it is the colour of the scene's rule label with probability `SHORTCUT_AGREEMENT` (else another label's, drawn
uniformly), in every out-of-domain split it is drawn uniformly, independent of the scene; an extra split
`ood_shortcut` (Mikels' 8, base rendering) isolates the broken shortcut from the rendering shift. A policy that reads
the badge instead of the three cues does well in-domain and at chance on `ood_shortcut`, and its step 1 need not name
the true cues. Metadata keeps `shortcut` (the label whose colour was drawn). In this variant the cues give the
training label on every image and the badge on 90 %, so nothing rewards reading the badge.

`conflict` is the variant where an outcome reward does push towards the shortcut: the same eight colours, painted
over the whole ground strip along the bottom of the image (`BADGE_PLACE`; a larger and more visible feature than
the corner square), and in `train` the label is the badge's. On a share `CONFLICT_SHARE` (three quarters) of
training images the badge shows another label than the cues' rule label (metadata `conflict`), so within each cue
combination the training labels are spread evenly over the rule label and its three neighbours: a policy that
answers from the cues earns the accuracy reward on a quarter of the images whatever it answers, one that reads the
badge earns it on all. A disagreeing badge shows a neighbour of the rule label: the
label that differs from it in exactly one of valence, arousal and family (`neighbours`), drawn uniformly from the
three. Those are the labels a cue-reading policy samples when it errs, so rollouts sometimes match the badge and the
outcome reward has something to reinforce; a badge two or three properties away is almost never sampled. Cold-Start
traces reason from the cues to their rule label on training images drawn whatever their badge, shown without the
badge (ids ending in `-nobadge`): Cold-Start learns the cues and never sees a badge, so it neither follows nor
learns to ignore one, and only GRPO's outcome reward points at it. `validation` and `test` are scored against the
rule label, with a badge that shows it on half the images (`CONFLICT_EVAL_AGREEMENT`) and a neighbour on the rest,
so accuracy where the badge disagrees against where it agrees (``accuracy_badge_disagrees`` /
``accuracy_badge_agrees`` of emor3.evaluate), the hallucinated-cue rate and answer-reasoning agreement show whether
a policy drifted from the cues to the badge: the setting where a reward for grounded reasoning (RER) should matter.
Out-of-domain splits and `ood_shortcut` draw the badge uniformly, as in `shortcut`.

Cold-start traces (`coldstart_trace`): a SET response built from the cues, e.g.
    <step1>A smiling face, a sunny sky and a gift.</step1><step2>With the gift under the sunny sky, one would
    feel playful and amused.</step2><step3>The smile makes it positive; the sunny sky gives high arousal.</step3>
    \\boxed{amusement}
with several phrasings per step (under 60 words), chosen by a seeded RNG. `cue_mentions(step1, cues)` says which
true cues a step-1 text names and which absent cues it claims (visual-text consistency at evaluation);
`step3_claims(step3)` which valence and arousal a step 3 concludes (step-3 correctness and answer agreement).

Determinism: each split's cue list and each image come from `random.Random` seeded with a string built from the
seed, split and index (string seeds hash with SHA-512, so they do not depend on PYTHONHASHSEED). Drawing is
integer pixel geometry with pillow, so the same seed gives the same PNG bytes.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from emor3.config import EmoScenesEval, EmoScenesVariant, choices
from emor3.data.dataset import EmotionDataset, LoadReport, Sample, write_atomic
from emor3.data.loaders import load_manifest, write_manifest
from emor3.data.taxonomy import BUILTIN_NAMES, MIKELS8, get_taxonomy

VERSION = 7  # bump when drawing, splits or rule change, so cached folders are regenerated
# the version of what `instruct_scenes` draws (its cue order, renderings and pixels), kept apart from VERSION so that a
# change to the benchmark's splits that leaves the instruct scenes as they were keeps the instruct checkpoints (and
# the shipped one) valid; bump it when the instruct scenes change. Versions 4 to 7 changed the splits only.
INSTRUCT_SCENES_VERSION = 3

FACES = ("smile", "frown")
SKIES = ("sunny", "stormy", "dusk", "night")
OBJECTS = ("gift", "heart", "spider", "flower")
CUE_VALUES = {"face": FACES, "sky": SKIES, "object": OBJECTS}

VALENCE_OF_FACE = {"smile": "positive", "frown": "negative"}
AROUSAL_OF_SKY = {"sunny": "high", "stormy": "high", "dusk": "low", "night": "low"}
FAMILY_OF_OBJECT = {"gift": "personal", "heart": "personal", "spider": "nature", "flower": "nature"}
RULE_TABLE = {
    ("positive", "high", "personal"): "amusement", ("positive", "high", "nature"): "excitement",
    ("positive", "low", "personal"): "contentment", ("positive", "low", "nature"): "awe",
    ("negative", "high", "personal"): "anger", ("negative", "high", "nature"): "fear",
    ("negative", "low", "personal"): "sadness", ("negative", "low", "nature"): "disgust",
}
MIKELS_TO_EMOTION6 = {"amusement": "joy", "contentment": "joy", "excitement": "joy", "awe": "surprise",
                      "anger": "anger", "disgust": "disgust", "fear": "fear", "sadness": "sadness"}


def all_cue_combinations() -> list[dict[str, str]]:
    return [dict(face=f, sky=s, object=o) for f, s, o in itertools.product(FACES, SKIES, OBJECTS)]


# The compositional hold-out: one (face, sky, object) combination per label, never drawn with a label in train, in
# validation, in test or in the Cold-Start traces. Each sky and each object is held out twice, once per face, and
# each pair of a held-out combination's values (face+sky, face+object, sky+object) occurs in training in another
# combination (the held-out sky+object pair with the other face), so every face, sky and object value, and every
# valence, arousal and family, is learned from other scenes: a policy that reasons through valence, arousal and
# family (SET's step 3) can answer these, a lookup of seen combinations cannot.
HELD_OUT_COMBINATIONS = (
    ("smile", "sunny", "gift"),     # amusement
    ("smile", "stormy", "flower"),  # excitement
    ("smile", "dusk", "heart"),     # contentment
    ("smile", "night", "spider"),   # awe
    ("frown", "stormy", "gift"),    # anger
    ("frown", "sunny", "spider"),   # fear
    ("frown", "night", "heart"),    # sadness
    ("frown", "dusk", "flower"),    # disgust
)


def _key(cues: dict[str, str]) -> tuple[str, str, str]:
    return cues["face"], cues["sky"], cues["object"]


def seen_combinations() -> list[dict[str, str]]:
    """The 24 combinations training draws (three per label): all but `HELD_OUT_COMBINATIONS`."""
    return [c for c in all_cue_combinations() if _key(c) not in HELD_OUT_COMBINATIONS]


def held_out_combinations() -> list[dict[str, str]]:
    return [c for c in all_cue_combinations() if _key(c) in HELD_OUT_COMBINATIONS]


COMBINATIONS = {"all": all_cue_combinations, "seen": seen_combinations, "held_out": held_out_combinations}


def cue_rounds(n: int, rng: random.Random, combos: str = "all") -> list[dict[str, str]]:
    """n cue combinations drawn as shuffled full rounds of the ``combos`` set (`COMBINATIONS`: all 32, the 24 seen
    in training, the 8 held out; each has as many combinations per label, so labels are balanced), shuffled by
    rng."""
    out: list[dict[str, str]] = []
    while len(out) < n:
        block = COMBINATIONS[combos]()
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


def rule_label(cues: dict[str, str]) -> str:
    """The Mikels' 8 label of a scene (module docstring)."""
    return RULE_TABLE[VALENCE_OF_FACE[cues["face"]], AROUSAL_OF_SKY[cues["sky"]], FAMILY_OF_OBJECT[cues["object"]]]


def label_for(cues: dict[str, str], taxonomy: str) -> str:
    """The scene's label in mikels8, emotion6 or binary."""
    mikels = rule_label(cues)
    name = get_taxonomy(taxonomy).name
    if name == "mikels8":
        return mikels
    if name == "emotion6":
        return MIKELS_TO_EMOTION6[mikels]
    if name == "binary":
        return MIKELS8.valence[mikels]
    raise ValueError(f"EmoScenes labels exist for mikels8, emotion6 and binary, not {taxonomy!r}")


# ---------------------------------------------------------------------------------------------------------------
# rendering


# the badge's colour per Mikels label: saturated, far from each other and from the ground strip's own colour
BADGE_COLOURS = {
    "amusement": (255, 0, 0), "excitement": (0, 0, 255), "contentment": (255, 255, 0), "awe": (0, 255, 255),
    "anger": (255, 0, 255), "fear": (255, 128, 0), "sadness": (255, 255, 255), "disgust": (0, 0, 0),
}


@dataclass(frozen=True)
class RenderStyle:
    """palette: a key of `PALETTES` ("base", "shifted", "faded"); scale: size of face and object; layout: a key of
    `LAYOUTS`."""

    palette: str = "base"
    scale: float = 1.0
    layout: str = "base"


BASE_STYLE = RenderStyle()
SHIFTED_STYLE = RenderStyle(palette="shifted", scale=0.8, layout="mirrored")
# the rendering no stage trains on (not in train, the Cold-Start traces or the instruct stage's `INSTRUCT_STYLES`):
# washed-out colours (the base palette faded halfway to grey, `PALETTES["faded"]`), larger shapes, the sky element
# centred. Faded rather than recoloured: under new hues the shipped instruct model names few of the objects, so labels
# there would sit near chance whatever a policy reasons; faded scenes it sees in part (benchmarks/perception.py
# measures how much).
UNSEEN_STYLE = RenderStyle(palette="faded", scale=1.1, layout="centred")
# x of the sky element, the face and the object, as fractions of the side
LAYOUTS = {"base": (0.78, 0.30, 0.72), "mirrored": (0.22, 0.70, 0.28), "centred": (0.50, 0.28, 0.74)}

PALETTES = {
    "base": dict(
        sunny=(110, 185, 250), stormy=(75, 75, 90), dusk_top=(240, 140, 70), dusk_bottom=(120, 60, 130),
        night=(15, 20, 60), ground=(90, 160, 80), sun=(255, 220, 40), cloud=(45, 45, 55), bolt=(255, 240, 80),
        dusk_sun=(220, 50, 40), moon=(240, 240, 210), star=(255, 255, 255), skin=(250, 210, 70), ink=(20, 20, 20),
        gift=(220, 40, 40), ribbon=(250, 220, 60), heart=(230, 30, 90), spider=(15, 15, 15), halo=(215, 215, 215),
        petal=(240, 120, 200), petal_center=(250, 210, 40), stem=(40, 140, 40)),
    "shifted": dict(
        sunny=(150, 215, 235), stormy=(100, 88, 115), dusk_top=(250, 175, 95), dusk_bottom=(150, 75, 115),
        night=(35, 12, 55), ground=(200, 180, 120), sun=(255, 250, 170), cloud=(70, 60, 80), bolt=(210, 250, 255),
        dusk_sun=(250, 100, 120), moon=(210, 225, 255), star=(255, 240, 200), skin=(240, 180, 140),
        ink=(60, 25, 15), gift=(40, 90, 220), ribbon=(250, 250, 250), heart=(200, 40, 200), spider=(70, 35, 10),
        halo=(235, 220, 170),
        petal=(250, 250, 130), petal_center=(240, 120, 30), stem=(20, 110, 90)),
}


def _faded(rgb: tuple[int, int, int], amount: float = 0.5) -> tuple[int, ...]:
    """A colour moved ``amount`` of the way to its own grey level: a washed-out version of it."""
    grey = sum(rgb) / 3
    return tuple(round(c + (grey - c) * amount) for c in rgb)


# the rendering no stage trains on: the base palette faded halfway to grey
PALETTES["faded"] = {k: _faded(v) for k, v in PALETTES["base"].items()}


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def render_scene(cues: dict[str, str], *, size: int = 112, style: RenderStyle = BASE_STYLE,
                 rng: random.Random | None = None, badge: str | None = None,
                 badge_place: str = "corner") -> Image.Image:
    """Draw one scene (RGB, size x size). rng drives small nuisance jitter (positions, sizes, colours). ``badge``: a
    Mikels label whose `BADGE_COLOURS` colour is drawn at ``badge_place`` (`BADGE_PLACES`): a square in the
    bottom-left corner, or the whole ground strip along the bottom, painted in place of the ground (under the face
    and the object, as the ground is)."""
    if badge_place not in BADGE_PLACES:
        raise ValueError(f"unknown badge place {badge_place!r}; known: {', '.join(BADGE_PLACES)}")
    rng = rng or random.Random(0)
    pal = {k: _jitter(v, rng) for k, v in PALETTES[style.palette].items()}
    S = size
    img = Image.new("RGB", (S, S), pal[cues["sky"]] if cues["sky"] != "dusk" else pal["dusk_top"])
    d = ImageDraw.Draw(img)
    if cues["sky"] == "dusk":  # vertical gradient, drawn as rows
        top, bot = pal["dusk_top"], pal["dusk_bottom"]
        for y in range(S):
            t = y / max(1, S - 1)
            d.line([(0, y), (S, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bot)))
    sky_x, face_x, object_x = LAYOUTS[style.layout]
    sx = sky_x * S + rng.uniform(-0.04, 0.04) * S
    sy = 0.19 * S + rng.uniform(-0.03, 0.03) * S
    _draw_sky(d, cues["sky"], sx, sy, S, pal, rng)
    ground = BADGE_COLOURS[badge] if badge is not None and badge_place == "ground" else pal["ground"]
    d.rectangle([0, round(0.84 * S), S, S], fill=ground)
    k = style.scale * rng.uniform(0.92, 1.08)
    fx = face_x * S + rng.uniform(-0.04, 0.04) * S
    ox = object_x * S + rng.uniform(-0.04, 0.04) * S
    fy = 0.62 * S + rng.uniform(-0.04, 0.04) * S
    oy = 0.62 * S + rng.uniform(-0.04, 0.04) * S
    _draw_face(d, cues["face"], fx, fy, 0.2 * S * k, S, pal)
    _draw_object(d, cues["object"], ox, oy, 0.18 * S * k, S, pal)
    if badge is not None and badge_place == "corner":  # fixed place and size, exact colour
        d.rectangle([0, round(0.85 * S), round(0.15 * S), S - 1], fill=BADGE_COLOURS[badge])
    return img


def _w(S: int, frac: float) -> int:
    return max(1, round(S * frac))


def _draw_sky(d: ImageDraw.ImageDraw, sky: str, x: float, y: float, S: int, pal: dict, rng: random.Random) -> None:
    r = 0.1 * S
    if sky == "sunny":
        for a in range(8):  # rays
            dx, dy = [(1, 0), (0.7, 0.7), (0, 1), (-0.7, 0.7), (-1, 0), (-0.7, -0.7), (0, -1), (0.7, -0.7)][a]
            d.line([(x + dx * r * 1.2, y + dy * r * 1.2), (x + dx * r * 1.7, y + dy * r * 1.7)], fill=pal["sun"],
                   width=_w(S, 1 / 40))
        d.ellipse([x - r, y - r, x + r, y + r], fill=pal["sun"])
    elif sky == "stormy":
        bolt = [(x - 0.2 * r, y), (x + 0.5 * r, y), (x + 0.05 * r, y + 0.9 * r), (x + 0.6 * r, y + 0.9 * r),
                (x - 0.4 * r, y + 2.3 * r), (x - 0.05 * r, y + 1.3 * r), (x - 0.55 * r, y + 1.3 * r)]
        d.polygon(bolt, fill=pal["bolt"])
        for cx, cy, rr in ((x - 0.9 * r, y - 0.1 * r, 0.8 * r), (x, y - 0.5 * r, r), (x + 0.9 * r, y - 0.1 * r,
                                                                                       0.8 * r)):
            d.ellipse([cx - rr * 1.2, cy - rr * 0.8, cx + rr * 1.2, cy + rr * 0.8], fill=pal["cloud"])
    elif sky == "dusk":
        d.ellipse([x - r, y - r, x + r, y + r], fill=pal["dusk_sun"])
        for k in range(1, 3):  # horizontal bands across the setting sun
            yy = y + k * 0.3 * r
            d.line([(x - r, yy), (x + r, yy)], fill=pal["dusk_top"], width=_w(S, 1 / 56))
    elif sky == "night":
        d.ellipse([x - r, y - r, x + r, y + r], fill=pal["moon"])
        o = 0.5 * r  # crescent: cover part of the disc with the sky colour
        d.ellipse([x - r + o, y - r - 0.2 * o, x + r + o, y + r - 0.2 * o], fill=pal["night"])
        for _ in range(6):
            px, py = rng.uniform(0.05, 0.95) * S, rng.uniform(0.03, 0.4) * S
            if abs(px - x) < 1.3 * r and abs(py - y) < 1.3 * r:
                continue
            s = max(1, S // 80)
            d.rectangle([px - s, py - s, px + s, py + s], fill=pal["star"])
    else:
        raise ValueError(f"unknown sky {sky!r}; known: {SKIES}")


def _draw_face(d: ImageDraw.ImageDraw, face: str, x: float, y: float, r: float, S: int, pal: dict) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=pal["skin"], outline=pal["ink"], width=_w(S, 1 / 56))
    e = 0.12 * r
    for ex in (x - 0.38 * r, x + 0.38 * r):
        d.ellipse([ex - e, y - 0.3 * r - e, ex + e, y - 0.3 * r + e], fill=pal["ink"])
    # the expression is drawn big (a tiny ViT sees 14 px patches) and differs in more than its shape, since a shape
    # alone inside one or two patches was learned late or never, depending on the seed: a smile is a wide open grin
    # (a filled half-disc, flat on top) with raised brows; a frown is a thin mouth line curving down, with heavy
    # brows slanting down, so the lower face is mostly ink in a smile and mostly skin in a frown
    mw, mh, bw = 0.7 * r, 0.6 * r, _w(S, 1 / 36)
    if face == "smile":
        d.chord([x - mw, y - 0.05 * r - mh, x + mw, y - 0.05 * r + mh], 0, 180, fill=pal["ink"])
        for ex in (x - 0.38 * r, x + 0.38 * r):
            d.arc([ex - 0.22 * r, y - 0.62 * r, ex + 0.22 * r, y - 0.38 * r], 200, 340, fill=pal["ink"], width=bw)
    elif face == "frown":
        d.arc([x - 0.5 * r, y + 0.3 * r, x + 0.5 * r, y + 0.9 * r], 200, 340, fill=pal["ink"], width=bw)
        d.line([(x - 0.65 * r, y - 0.65 * r), (x - 0.1 * r, y - 0.4 * r)], fill=pal["ink"], width=2 * bw)
        d.line([(x + 0.65 * r, y - 0.65 * r), (x + 0.1 * r, y - 0.4 * r)], fill=pal["ink"], width=2 * bw)
    else:
        raise ValueError(f"unknown face {face!r}; known: {FACES}")


def _draw_object(d: ImageDraw.ImageDraw, obj: str, x: float, y: float, r: float, S: int, pal: dict) -> None:
    if obj == "gift":
        d.rectangle([x - r, y - 0.7 * r, x + r, y + r], fill=pal["gift"])
        b = 0.14 * r
        d.rectangle([x - b, y - 0.7 * r, x + b, y + r], fill=pal["ribbon"])
        d.rectangle([x - r, y + 0.15 * r - b, x + r, y + 0.15 * r + b], fill=pal["ribbon"])
        d.polygon([(x, y - 0.7 * r), (x - 0.6 * r, y - 1.1 * r), (x - 0.6 * r, y - 0.7 * r)], fill=pal["ribbon"])
        d.polygon([(x, y - 0.7 * r), (x + 0.6 * r, y - 1.1 * r), (x + 0.6 * r, y - 0.7 * r)], fill=pal["ribbon"])
    elif obj == "heart":
        c = 0.52 * r
        d.ellipse([x - 0.5 * r - c, y - 0.35 * r - c, x - 0.5 * r + c, y - 0.35 * r + c], fill=pal["heart"])
        d.ellipse([x + 0.5 * r - c, y - 0.35 * r - c, x + 0.5 * r + c, y - 0.35 * r + c], fill=pal["heart"])
        d.polygon([(x - 1.0 * r, y - 0.2 * r), (x + 1.0 * r, y - 0.2 * r), (x, y + r)], fill=pal["heart"])
    elif obj == "spider":
        lw = _w(S, 1 / 45)
        # drawn twice, a light halo first, so the dark spider stays visible on the dark night and storm skies
        for colour, extra in ((pal["halo"], _w(S, 1 / 56) * 2), (pal["spider"], 0)):
            for side in (-1, 1):
                for k in range(4):
                    y0 = y - 0.25 * r + k * 0.22 * r
                    knee = (x + side * 0.75 * r, y0 - 0.45 * r + k * 0.12 * r)
                    foot = (x + side * 1.05 * r, y0 + 0.35 * r + k * 0.1 * r)
                    d.line([(x, y0), knee, foot], fill=colour, width=lw + extra)
            e = extra / 2
            d.ellipse([x - 0.42 * r - e, y - 0.3 * r - e, x + 0.42 * r + e, y + 0.65 * r + e], fill=colour)
            d.ellipse([x - 0.28 * r - e, y - 0.65 * r - e, x + 0.28 * r + e, y - 0.15 * r + e], fill=colour)
    elif obj == "flower":
        d.line([(x, y - 0.1 * r), (x, y + r)], fill=pal["stem"], width=_w(S, 1 / 30))
        d.ellipse([x, y + 0.35 * r, x + 0.5 * r, y + 0.6 * r], fill=pal["stem"])
        cy, pr = y - 0.3 * r, 0.33 * r
        for k in range(5):
            a = 2 * math.pi * k / 5 - math.pi / 2
            px, py = x + 0.45 * r * math.cos(a), cy + 0.45 * r * math.sin(a)
            d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=pal["petal"])
        c = 0.22 * r
        d.ellipse([x - c, cy - c, x + c, cy + c], fill=pal["petal_center"])
    else:
        raise ValueError(f"unknown object {obj!r}; known: {OBJECTS}")


def jittered_palette(style: RenderStyle, rng: random.Random) -> dict:
    """The colours of one scene in ``style``, each jittered by rng as `render_scene` jitters them (for renderers
    that compose their own frames from the cue drawings: `emor3.toy.emoscenes_clips`)."""
    return {k: _jitter(v, rng) for k, v in PALETTES[style.palette].items()}


def draw_cue(d: ImageDraw.ImageDraw, kind: str, value: str, x: float, y: float, r: float, S: int, pal: dict,
             rng: random.Random) -> None:
    """Draw one cue's element as `render_scene` does: kind "sky" (the sun, storm, dusk sun or moon at x, y; rng
    places the stars), "face" or "object" (centred at x, y, radius r)."""
    if kind == "sky":
        _draw_sky(d, value, x, y, S, pal, rng)
    elif kind == "face":
        _draw_face(d, value, x, y, r, S, pal)
    elif kind == "object":
        _draw_object(d, value, x, y, r, S, pal)
    else:
        raise ValueError(f"unknown cue kind {kind!r}; known: {tuple(CUE_VALUES)}")


@dataclass(frozen=True)
class SceneImage:
    """An EmoScenes image drawn on demand (an `ImageSource`): the same fields always give the same pixels."""

    cues: tuple[tuple[str, str], ...]
    size: int
    style: RenderStyle
    seed: str  # the string seed of the per-image RNG
    badge: str | None = None  # the shortcut or conflict variant's badge (a Mikels label), or None
    badge_place: str = "corner"  # where the badge is drawn (`BADGE_PLACES`)

    @property
    def key(self) -> str:
        tail = "" if self.badge is None else f":badge={self.badge}@{self.badge_place}"
        return f"emoscenes-v{VERSION}:{self.seed}:{self.size}:{self.style}{tail}"

    def open(self) -> Image.Image:
        return render_scene(dict(self.cues), size=self.size, style=self.style, rng=random.Random(self.seed),
                            badge=self.badge, badge_place=self.badge_place)


# ---------------------------------------------------------------------------------------------------------------
# splits


@dataclass(frozen=True)
class SplitSpec:
    taxonomy: str
    style: RenderStyle
    noisy: bool = False  # only the training split gets label noise
    domain: str = "in"   # "in" or "out": which average of the A^I / A^O table it counts towards
    in_table: bool = True  # evaluated in a run's final table (module docstring: what ood_binary cannot measure)
    variants: tuple[str, ...] | None = None  # the only variants that have this split; None: every variant
    combos: str = "seen"  # which cue combinations it draws (`COMBINATIONS`): the 24 seen in training by default
    selection: bool = False  # the split settings are chosen on (`--data.emoscenes-eval validation`)


SPLITS = {
    "train": SplitSpec("mikels8", BASE_STYLE, noisy=True, in_table=False),
    "validation": SplitSpec("mikels8", BASE_STYLE, in_table=False, selection=True),
    "test": SplitSpec("mikels8", BASE_STYLE),
    "compositional": SplitSpec("mikels8", BASE_STYLE, domain="out", combos="held_out"),
    "ood_render": SplitSpec("mikels8", SHIFTED_STYLE, domain="out"),
    "ood_unseen": SplitSpec("mikels8", UNSEEN_STYLE, domain="out"),
    "ood_emotion6": SplitSpec("emotion6", SHIFTED_STYLE, domain="out", in_table=False, combos="all"),
    "ood_binary": SplitSpec("binary", SHIFTED_STYLE, domain="out", in_table=False, combos="all"),
    "ood_shortcut": SplitSpec("mikels8", BASE_STYLE, domain="out", variants=("shortcut", "conflict")),
}
VARIANTS = choices(EmoScenesVariant)
SHORTCUT_AGREEMENT = 0.9  # share of in-domain images whose badge shows their rule label (shortcut variant)
CONFLICT_SHARE = 0.75  # share of training images whose badge, and so label, is not the rule label (conflict)
CONFLICT_EVAL_AGREEMENT = 0.5  # share of validation / test images whose badge shows the rule label (conflict)
# where each variant draws its badge: shortcut, a small square in the bottom-left corner; conflict, the whole ground
# strip (in each of the bottom row's four merged 28-px patches of the tiny model at 112 px)
BADGE_PLACES = ("corner", "ground")
BADGE_PLACE = {"shortcut": "corner", "conflict": "ground"}
EVAL_SPLITS = choices(EmoScenesEval)  # what a run evaluates (`eval_split_names`)


def eval_split_names(which: str = "table", variant: str = "default") -> list[str]:
    """The splits a run evaluates: "table", the final table's (test, compositional, ood_render, ood_unseen, and
    ood_shortcut in the shortcut variant); "validation", the split settings are chosen on, which reads no test
    image."""
    if which not in EVAL_SPLITS:
        raise ValueError(f"unknown EmoScenes evaluation {which!r}; known: {', '.join(EVAL_SPLITS)}")
    names = split_sizes(0, 0, 0, variant)
    return [n for n in names if (SPLITS[n].selection if which == "validation" else SPLITS[n].in_table)]


def split_sizes(n_train: int, n_test: int, n_ood: int, variant: str = "default") -> dict[str, int]:
    """The splits a variant has, in `SPLITS` order, with their sizes: validation as many as test, every
    out-of-domain split (the compositional hold-out included) n_ood."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EmoScenes variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "clips":  # not images: a module of its own
        raise ValueError("the EmoScenes clip variant is drawn by emor3.toy.emoscenes_clips, not as images")
    n = {"train": n_train, "validation": n_test, "test": n_test}
    return {name: n.get(name, n_ood) for name, spec in SPLITS.items()
            if spec.variants is None or variant in spec.variants}


def _badge(split: str, truth: str, rng: random.Random, variant: str) -> str:
    """The badge's label: in-domain the rule label with prob. SHORTCUT_AGREEMENT (shortcut), 1 - CONFLICT_SHARE in
    train and CONFLICT_EVAL_AGREEMENT in validation / test (conflict), else another label; uniform out of domain."""
    if SPLITS[split].domain != "in":
        return rng.choice(list(MIKELS8.labels))
    agree = SHORTCUT_AGREEMENT if variant == "shortcut" else (
        1.0 - CONFLICT_SHARE if split == "train" else CONFLICT_EVAL_AGREEMENT)
    if rng.random() < agree:
        return truth
    if variant == "conflict":
        return rng.choice(neighbours(truth))
    return rng.choice([x for x in MIKELS8.labels if x != truth])


def neighbours(label: str) -> list[str]:
    """The three Mikels labels that differ from ``label`` in exactly one of valence, arousal and family."""
    key = next(k for k, v in RULE_TABLE.items() if v == label)
    return [v for k, v in RULE_TABLE.items() if sum(a != b for a, b in zip(k, key)) == 1]


def make_split(split: str, n: int, *, seed: int, image_size: int = 112, label_noise: float = 0.0,
               variant: str = "default") -> list[Sample]:
    """n samples of `split` (images drawn lazily via SceneImage). label_noise applies to noisy splits only."""
    if split not in SPLITS:
        raise KeyError(f"unknown EmoScenes split {split!r}; known: {list(SPLITS)}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    if split not in split_sizes(0, 0, 0, variant):
        raise KeyError(f"EmoScenes split {split!r} exists only in the variants {', '.join(SPLITS[split].variants)}")
    spec = SPLITS[split]
    tax = get_taxonomy(spec.taxonomy)
    # every split has its own seed stream (the split's name is in every seed string)
    cue_list = cue_rounds(n, random.Random(f"emoscenes:{seed}:{split}:order"), spec.combos)
    samples = []
    for i, cues in enumerate(cue_list):
        truth = label_for(cues, tax.name)
        label, noisy = truth, False
        if spec.noisy and label_noise > 0:
            nrng = random.Random(f"emoscenes:{seed}:{split}:{i}:noise")
            if nrng.random() < label_noise:
                label, noisy = nrng.choice([x for x in tax.labels if x != truth]), True
        sid = f"emoscenes-{split}-{i:05d}"
        badge = None
        if variant in ("shortcut", "conflict"):
            badge = _badge(split, rule_label(cues), random.Random(f"emoscenes:{seed}:{split}:{i}:badge"), variant)
        conflict = variant == "conflict" and split == "train" and badge != truth
        if conflict:  # the training label follows the badge
            label, noisy = badge, False
        image = SceneImage(tuple(sorted(cues.items())), image_size, spec.style, f"emoscenes:{seed}:{split}:{i}",
                           badge, BADGE_PLACE.get(variant, "corner"))
        meta = {"cues": dict(cues), "rule_label": truth, "noisy": noisy, "split": split, "domain": spec.domain,
                "style": asdict(spec.style)}
        if badge is not None:
            meta["shortcut"] = badge
        if variant == "conflict" and split == "train":
            meta["conflict"] = conflict
        samples.append(Sample(sid, image, label, tax.name, meta))
    return samples


def coldstart_subset(train: list[Sample], n: int, *, seed: int) -> list[Sample]:
    """n training samples without label noise, round-robin over labels, each with a SET reference `response` in
    metadata. A trace reasons from the cues to their rule label, so an image of the conflict variant whose badge
    shows another label enters with the rule label (its metadata keeps ``conflict``). In that variant every trace
    shows its scene without the badge (id ``<train id>-nobadge``): the traces teach the cues and nothing about the
    badge."""
    rng = random.Random(f"emoscenes:{seed}:coldstart")
    by_label: dict[str, list[Sample]] = {}
    for s in train:
        if "conflict" in s.metadata:
            meta = {k: v for k, v in s.metadata.items() if k != "shortcut"}
            s = Sample(f"{s.id}-nobadge", replace(s.image, badge=None), meta["rule_label"], s.taxonomy, meta)
        if not s.metadata.get("noisy"):
            by_label.setdefault(s.label, []).append(s)
    chosen: list[Sample] = []
    queues = [list(v) for _, v in sorted(by_label.items())]
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    out = []
    for s in chosen:
        meta = dict(s.metadata, response=coldstart_trace(s.metadata["cues"], s.taxonomy, rng))
        out.append(Sample(s.id, s.image, s.label, s.taxonomy, meta))
    return out


def make_emoscenes(*, seed: int, n_train: int, n_test: int, n_ood: int, image_size: int = 112,
                   label_noise: float = 0.0, n_coldstart: int = 0,
                   variant: str = "default") -> dict[str, EmotionDataset]:
    """All splits of a variant in memory (images drawn on first access): train, validation, test, compositional,
    ood_*, and coldstart if n_coldstart."""
    out: dict[str, EmotionDataset] = {}
    for split, n in split_sizes(n_train, n_test, n_ood, variant).items():
        if n <= 0:
            continue
        samples = make_split(split, n, seed=seed, image_size=image_size, label_noise=label_noise, variant=variant)
        out[split] = EmotionDataset(samples, SPLITS[split].taxonomy,
                                    LoadReport(f"emoscenes:{split}", "emoscenes", SPLITS[split].taxonomy))
    if n_coldstart > 0:
        if "train" not in out:
            raise ValueError("cold-start traces are drawn from the training split: n_train must be > 0")
        cs = coldstart_subset(out["train"].samples, n_coldstart, seed=seed)
        out["coldstart"] = EmotionDataset(cs, "mikels8", LoadReport("emoscenes:coldstart", "emoscenes", "mikels8"))
    return out


def written_before(stamp: Path, config: dict, paths: dict[str, Path], overwrite: bool) -> bool:
    """Whether a folder already holds ``paths`` written with ``config`` (its ``stamp`` file records it), so a writer
    can reuse it; otherwise the stamp is removed first, so a crash mid-write cannot leave a folder that looks
    complete."""
    if not overwrite and stamp.is_file() and all(p.is_file() for p in paths.values()):
        try:
            if json.loads(stamp.read_text()) == config:
                return True
        except json.JSONDecodeError:
            pass
    stamp.unlink(missing_ok=True)
    return False


def write_emoscenes(out_dir: str | Path, *, seed: int, n_train: int, n_test: int, n_ood: int,
                    image_size: int = 112, label_noise: float = 0.0, n_coldstart: int = 0,
                    overwrite: bool = False, variant: str = "default") -> dict[str, Path]:
    """Write every split as `<split>.jsonl` + `images/<split>/<id>.png` under out_dir; returns manifest paths.

    A folder already holding the same configuration (emoscenes.json) is reused as is, unless overwrite.
    """
    out_dir = Path(out_dir)
    config = dict(version=VERSION, seed=seed, n_train=n_train, n_test=n_test, n_ood=n_ood, image_size=image_size,
                  label_noise=label_noise, n_coldstart=n_coldstart)
    if variant != "default":
        config["variant"] = variant
    stamp = out_dir / "emoscenes.json"
    sizes = dict(split_sizes(n_train, n_test, n_ood, variant), coldstart=n_coldstart)
    names = [s for s, n in sizes.items() if n > 0]
    paths = {s: out_dir / f"{s}.jsonl" for s in names}
    if written_before(stamp, config, paths, overwrite):
        return paths
    datasets = make_emoscenes(seed=seed, n_train=n_train, n_test=n_test, n_ood=n_ood, image_size=image_size,
                              label_noise=label_noise, n_coldstart=n_coldstart, variant=variant)
    written: dict[str, str] = {}
    for split, ds in datasets.items():
        rows = []
        for s in ds.samples:
            if s.id not in written:
                rel = f"images/{s.metadata['split']}/{s.id}.png"
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(out_dir / rel, lambda f: s.open_image().save(f, format="PNG"))
                written[s.id] = rel
            rows.append({"id": s.id, "image": written[s.id], "label": s.label, "taxonomy": s.taxonomy,
                         **s.metadata})
        write_manifest(paths[split], rows)
    write_atomic(stamp, lambda f: f.write(json.dumps(config, indent=1).encode()))
    return paths



def load_emoscenes(cache_dir: str | Path, *, seed: int, n_train: int, n_test: int, n_ood: int,
                   image_size: int = 112, label_noise: float = 0.0, n_coldstart: int = 0, variant: str = "default",
                   **dataset_kw) -> dict[str, EmotionDataset]:
    """Generate (or reuse) EmoScenes under `cache_dir/seed<seed>-<size>px...` and load every split from disk."""
    sub = Path(cache_dir) / f"seed{seed}-{image_size}px-n{n_train}-{n_test}-{n_ood}-{n_coldstart}-noise{label_noise}"
    if variant != "default":
        sub = sub.with_name(sub.name + f"-{variant}")
    paths = write_emoscenes(sub, seed=seed, n_train=n_train, n_test=n_test, n_ood=n_ood, image_size=image_size,
                            label_noise=label_noise, n_coldstart=n_coldstart, variant=variant)
    return {split: load_manifest(p, verify="header", **dataset_kw) for split, p in paths.items()}


# ---------------------------------------------------------------------------------------------------------------
# cold-start traces and cue checking

FACE_WORDS = {"smile": "smiling", "frown": "frowning"}
SKY_WORDS = {"sunny": "sunny sky", "stormy": "stormy sky", "dusk": "dusk sky", "night": "night sky"}
STEP1 = (
    "A {face} face, a {sky} and a {object}.",
    "I see a {object} next to a {face} face under a {sky}.",
    "The scene shows a {face} face, a {object} and a {sky}.",
    "Cues: a {face} face, a {sky}, a {object}.",
)
FEELINGS = {
    "amusement": ("playful and amused", "light-hearted and entertained"),
    "excitement": ("thrilled and energized", "eager and excited"),
    "contentment": ("calm and satisfied", "cozy and at peace"),
    "awe": ("small and full of wonder", "quietly amazed"),
    "anger": ("irritated and hostile", "provoked and angry"),
    "fear": ("tense and frightened", "threatened and scared"),
    "disgust": ("repelled and uneasy", "grossed out"),
    "sadness": ("low and sorrowful", "gloomy and heavy-hearted"),
    "joy": ("happy and cheerful", "glad and joyful"),
    "surprise": ("astonished", "caught off guard"),
    "positive": ("good about it", "pleased"),
    "negative": ("bad about it", "upset"),
}
STEP2 = (
    "With the {object} and the {sky}, one would feel {feeling}.",
    "A person would feel {feeling}.",
    "Seeing this, people feel {feeling}.",
)
STEP3 = (
    "The {face_noun} makes it {valence}; the {sky} gives {arousal} arousal.",
    "The emotion is {valence} with {arousal} arousal.",
    "{Valence} valence and {arousal} arousal.",
)


# the instruct stage's questions (emor3.toy.instruct.instruct_examples): a description, and one question per cue
# kind with its answer per cue value
DESCRIBE_QUESTION = "Describe the image."
CUE_QUESTIONS = {
    "face": ("Is the face smiling or frowning?", {"smile": "smiling", "frown": "frowning"}),
    "sky": ("What is the sky like?", {"sunny": "sunny", "stormy": "stormy", "dusk": "dusk", "night": "night"}),
    "object": ("What object is in the image?", {v: v for v in OBJECTS}),
}


def describe_scene(cues: dict[str, str], rng: random.Random | None = None) -> str:
    """A one-sentence description of a scene's three cues (one of the `STEP1` phrasings, seeded by rng): what an
    instruct model would say when asked to describe the image, and step 1 of a cold-start trace."""
    rng = rng or random.Random(0)
    return rng.choice(STEP1).format(face=FACE_WORDS[cues["face"]], sky=SKY_WORDS[cues["sky"]], object=cues["object"])


# the renderings the instruct stage sees: every one the benchmark uses, as a pretrained model has seen images of
# every kind. No emotion label is taught there, so `ood_render` still measures whether the cue-to-label reasoning of
# Cold-Start SFT and GRPO (base rendering only) carries over to another rendering.
INSTRUCT_STYLES = (BASE_STYLE, SHIFTED_STYLE)


def instruct_scenes(n: int, *, seed: int, image_size: int = 112,
                    styles: tuple[RenderStyle, ...] = INSTRUCT_STYLES) -> list[Sample]:
    """n scenes for the tiny model's instruct stage (captions and yes/no questions, no emotion labels), drawn from
    their own seeds (``emoscenes:<seed>:instruct:<i>``), so no image of a benchmark split is among them. Scene i is
    drawn in ``styles[i % len(styles)]``; each style's cues come in shuffled full rounds of the 32 combinations, so a
    longer list starts with the shorter one. Images are drawn lazily (`SceneImage`)."""
    k = len(styles)
    rounds = [cue_rounds(-(-n // k), random.Random(f"emoscenes:{seed}:instruct:order:{j}")) for j in range(k)]
    out = []
    for i in range(n):
        style, cues = styles[i % k], rounds[i % k][i // k]
        image = SceneImage(tuple(sorted(cues.items())), image_size, style, f"emoscenes:{seed}:instruct:{i}")
        out.append(Sample(f"emoscenes-instruct-{i:05d}", image, rule_label(cues), "mikels8",
                          {"cues": dict(cues), "split": "instruct", "rendering": style.palette}))
    return out


def coldstart_trace(cues: dict[str, str], taxonomy: str = "mikels8", rng: random.Random | None = None) -> str:
    """A short SET-formatted reference response for a scene, phrased at random (seeded by rng)."""
    rng = rng or random.Random(0)
    label = label_for(cues, taxonomy)
    valence, arousal = VALENCE_OF_FACE[cues["face"]], AROUSAL_OF_SKY[cues["sky"]]
    fill = dict(face=FACE_WORDS[cues["face"]], sky=SKY_WORDS[cues["sky"]], object=cues["object"],
                feeling=rng.choice(FEELINGS[label]), valence=valence, Valence=valence.capitalize(),
                arousal=arousal, face_noun=cues["face"])
    s1, s2, s3 = (rng.choice(t).format(**fill) for t in (STEP1, STEP2, STEP3))
    return f"<step1>{s1}</step1><step2>{s2}</step2><step3>{s3}</step3>\\boxed{{{label}}}"


# words that name each cue value in free text (matched as whole words, case-insensitive)
CUE_SYNONYMS = {
    "face": {"smile": ("smile", "smiles", "smiling", "grin", "grinning", "happy face", "smiley"),
             "frown": ("frown", "frowns", "frowning", "scowl", "scowling", "sad face", "angry face", "grimace")},
    "sky": {"sunny": ("sunny", "sun", "sunshine", "sunlit", "sunlight", "daylight", "bright sky"),
            "stormy": ("stormy", "storm", "thunder", "thunderstorm", "lightning", "thundercloud"),
            "dusk": ("dusk", "sunset", "twilight", "evening", "dusky"),
            "night": ("night", "nighttime", "moon", "moonlit", "moonlight", "starry", "stars", "night sky")},
    "object": {"gift": ("gift", "gifts", "present", "presents", "gift box"),
               "heart": ("heart", "hearts"),
               "spider": ("spider", "spiders", "tarantula"),
               "flower": ("flower", "flowers", "blossom", "bloom", "daisy")},
}
# words of one value that name an element another value's scene draws too: a dusk scene draws a red sun, so "the
# sun" there names no sunny sky and is no wrong claim either (in a sunny scene it names the sunny sky, in a stormy or
# night one it claims it)
ALSO_DRAWN = {"sky": {"dusk": ("sun",)}}
# a negation, then at most two words before the mention, within one clause: "no big spider" and "I don't see a
# spider" negate the spider, "not stormy, a spider" and "not a gift but a spider" do not (punctuation and "but" end
# the negation's scope). The contraction "n't" ends a word ("don't", "isn't"), so it has no word boundary before it.
# Idioms whose negation negates nothing after them ("no doubt a smiling face", "not only a gift") are not negations.
_NEGATION = re.compile(r"(?:\b(?:no|not|without|never|nor)|n['’]t)\s+(?!(?:doubt|only|question|wonder)\b)"
                       r"(?:(?!but\b)\w+\s+){0,2}$", re.I)


@dataclass(frozen=True)
class CueMentions:
    """Which true cues a text names (`named`, per cue kind) and which absent cue values it claims (`wrong`, pairs
    (kind, value))."""

    named: dict
    wrong: tuple

    @property
    def recall(self) -> float:
        """Share of the scene's cue kinds whose true value the text names."""
        return sum(self.named.values()) / max(1, len(self.named))

    @property
    def wrong_kinds(self) -> dict:
        """Per cue kind of the scene: does the text claim a value of that kind that is not in the scene."""
        claimed = {kind for kind, _ in self.wrong}
        return {kind: kind in claimed for kind in self.named}

    @property
    def hallucination(self) -> float:
        """Share of the scene's cue kinds for which the text claims a value that is not in the scene ("a spider"
        beside a gift). A text may both name the true value and claim a wrong one: the two rates are separate."""
        return sum(self.wrong_kinds.values()) / max(1, len(self.named))

    @property
    def precision(self) -> float:
        hits = sum(self.named.values())
        return hits / (hits + len(self.wrong)) if hits + len(self.wrong) else 0.0


def _mentions(text: str, words: tuple[str, ...]) -> bool:
    for w in words:
        for m in re.finditer(r"\b" + re.escape(w) + r"\b", text, re.I):
            if not _NEGATION.search(text[: m.start()]):  # "no spider" does not claim a spider
                return True
    return False


def cue_mentions(step1: str | None, cues: dict[str, Any]) -> CueMentions:
    """Which of the scene's true cues `step1` names, and which cue values it names that are not in the scene (a word
    in `ALSO_DRAWN` for the scene's own value claims nothing)."""
    text = step1 or ""
    named, wrong = {}, []
    for kind, values in CUE_SYNONYMS.items():
        if kind not in cues:
            continue
        named[kind] = _mentions(text, values[cues[kind]])
        shared = set(ALSO_DRAWN.get(kind, {}).get(cues[kind], ()))
        wrong += [(kind, v) for v, words in values.items()
                  if v != cues[kind] and _mentions(text, tuple(w for w in words if w not in shared))]
    return CueMentions(named, tuple(wrong))


# what step 3 concludes: the valence and the arousal it states, matched as whole words outside a negation
_VALENCE_WORDS = {"positive": ("positive", "pleasant"), "negative": ("negative", "unpleasant")}
_AROUSAL_PATTERNS = {a: (re.compile(rf"\b{a}(?:[- ]\w+)?\s+arousal\b", re.I),
                         re.compile(rf"\barousal\s+(?:is\s+|was\s+|of\s+)?{a}\b", re.I))
                     for a in ("high", "low")}


def step3_claims(step3: str | None) -> tuple[str | None, str | None]:
    """(valence, arousal) that a step-3 text states: "positive" / "negative" where exactly one of them is stated
    (not negated: "not positive but negative" is negative), "high" / "low" where exactly one is stated next to the
    word arousal ("high arousal", "arousal is low"); None where the text states neither or both."""
    text = step3 or ""
    valences = [v for v, words in _VALENCE_WORDS.items() if _mentions(text, words)]
    arousals = [a for a, pats in _AROUSAL_PATTERNS.items()
                if any(not _NEGATION.search(text[: m.start()]) for p in pats for m in p.finditer(text))]
    return (valences[0] if len(valences) == 1 else None), (arousals[0] if len(arousals) == 1 else None)


def scene_properties(cues: dict[str, str]) -> tuple[str, str]:
    """(valence, arousal) of a scene, by the rule (module docstring)."""
    return VALENCE_OF_FACE[cues["face"]], AROUSAL_OF_SKY[cues["sky"]]


def corpus_texts(seed: int = 0, repeats: int = 2) -> list[str]:
    """Representative texts for training the tiny tokenizer: traces of every cue combination in every taxonomy,
    label lists of the built-in taxonomies, and cue words."""
    rng = random.Random(f"emoscenes:{seed}:corpus")
    texts = []
    for _ in range(repeats):
        for cues in all_cue_combinations():
            for tax in ("mikels8", "emotion6", "binary"):
                texts.append(coldstart_trace(cues, tax, rng))
    for name in BUILTIN_NAMES:
        labels = get_taxonomy(name).labels
        texts.append(", ".join(labels))
        texts.extend(labels)
    for kind, values in CUE_SYNONYMS.items():
        texts.append(" ".join(w for words in values.values() for w in words))
    texts += ["yes", "no", "Yes.", "No."]
    return texts
