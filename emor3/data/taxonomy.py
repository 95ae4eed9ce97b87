"""Emotion taxonomies: label sets in a fixed order, synonyms, valence and arousal, and mappings between them.

A `Taxonomy` is an ordered tuple of canonical labels plus, per label, its synonyms, its valence ("positive",
"negative" or "neutral") and its arousal ("high", "low" or None where not defined). Labels are lower case; the
order is the order prompts list them in and the order of the datasets' own label indices.

Built-in taxonomies (`get_taxonomy(name)`; `BUILTIN_NAMES` lists them):
- `mikels8` (aliases emoset, fi, artphoto, abstract): amusement, anger, awe, contentment, disgust, excitement,
  fear, sadness; the alphabetical order EmoSet, FI, ArtPhoto and Abstract use (docs/method.md, "Data and protocol").
  Valence is Mikels' split (4 positive, 4 negative). Arousal is a documented choice of ours, not a rating study:
  high for amusement, excitement, anger, fear; low for awe, contentment, disgust, sadness (awe and disgust are
  often rated mid-arousal; EmoScenes uses exactly this split, see emoscenes.py).
- `emotion6`: anger, disgust, fear, joy, sadness, surprise (Emotion6, Peng et al. 2015). Choice: surprise has
  valence "neutral" (it is pleasant or unpleasant depending on the cause), so it has no binary image; a
  ground-truth "surprise" is not scorable on the binary level (`to_binary` returns None) and a predicted
  "surprise" is wrong against any positive or negative truth.
- `binary`: positive, negative.
- `webemo2`, `webemo7`, `webemo25`: the three levels of WebEmo (Panda et al., ECCV 2018). The label lists and
  their order are those of a public WebEmo configuration (label maps `{'positive': 0, 'negative': 1}`,
  `{'love', 'joy', 'surprise', 'confusion', 'sadness', 'anger', 'fear'}` and the 25 leaves below), found with
  the project's code search; the dataset's own files spell two leaves "cheerfullness" and "irritabilty" — we use
  the English spellings as labels and keep the dataset spellings as synonyms, so its files load. NOT confirmed:
  which 7-level parent each 25-level leaf has (we give Parrott's tree, which WebEmo is built on, as `parents`,
  with gratitude, which Parrott lacks, put under love) and the valence of WebEmo's "surprise" (neutral here, as
  for Emotion6). Where that matters, load your own lists from a file with `load_taxonomy` (format below).

Mappings go through valence (`map_label`, `to_binary`): a label maps to the target label of the same name (or
synonym) if there is one, else to its parent where the target is its hierarchy's upper level, otherwise to every
target label with the same valence; so any prediction can be scored
on the binary level (`binary_correct`).

User taxonomies (`load_taxonomy(path)`), TOML or JSON, one table per label:
    name = "mine"
    [[labels]]
    name = "happy"
    valence = "positive"      # positive | negative | neutral (required: mappings go through it)
    arousal = "high"          # high | low (optional)
    synonyms = ["glad"]       # optional
    parent = "joy"            # optional
JSON is the same structure (`{"name": ..., "labels": [{...}, ...]}`). TOML is read by
`emor3.config.load_toml` (`tomllib`, Python 3.11+, or `tomli` if installed); JSON always works.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from emor3.config import load_toml

VALENCES = ("positive", "negative", "neutral")
AROUSALS = ("high", "low", None)


def normalize_label(text: str) -> str:
    """Lower case, underscores/dashes to spaces, surrounding punctuation and repeated whitespace removed."""
    text = str(text).strip().lower().replace("_", " ").replace("-", " ")
    text = re.sub(r"\s+", " ", text)
    return text.strip(" \t\n.,;:!?\"'`()[]{}")


@dataclass(frozen=True)
class Taxonomy:
    """An emotion label set. `synonyms`, `valence`, `arousal`, `parents` are keyed by canonical label."""

    name: str
    labels: tuple[str, ...]
    synonyms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    valence: Mapping[str, str] = field(default_factory=dict)
    arousal: Mapping[str, str | None] = field(default_factory=dict)
    parents: Mapping[str, str] = field(default_factory=dict)
    source: str = "built-in"

    def __post_init__(self) -> None:
        where = f"taxonomy {self.name!r} ({self.source})"
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        if not labels:
            raise ValueError(f"{where}: no labels")
        for lab in labels:
            if lab != normalize_label(lab) or not lab:
                raise ValueError(f"{where}: label {lab!r} must be lower case, trimmed, without punctuation")
        if len(set(labels)) != len(labels):
            dup = sorted({x for x in labels if labels.count(x) > 1})
            raise ValueError(f"{where}: duplicate labels {dup}")
        for attr, allowed in (("valence", VALENCES), ("arousal", AROUSALS)):
            d = dict(getattr(self, attr))
            for lab in labels:
                d.setdefault(lab, None if attr == "arousal" else "neutral")
                if d[lab] not in allowed:
                    raise ValueError(f"{where}: label {lab!r} has {attr} {d[lab]!r}; allowed: {allowed}")
            extra = set(d) - set(labels)
            if extra:
                raise ValueError(f"{where}: {attr} given for unknown labels {sorted(extra)}")
            object.__setattr__(self, attr, d)
        syn = {lab: tuple(normalize_label(s) for s in self.synonyms.get(lab, ())) for lab in labels}
        extra = set(self.synonyms) - set(labels)
        if extra:
            raise ValueError(f"{where}: synonyms given for unknown labels {sorted(extra)}")
        object.__setattr__(self, "synonyms", syn)
        object.__setattr__(self, "parents", dict(self.parents))
        # one lookup table from any accepted spelling to its label; a spelling may not name two labels
        lookup: dict[str, str] = {lab: lab for lab in labels}
        for lab in labels:
            for s in syn[lab]:
                if lookup.get(s, lab) != lab:
                    raise ValueError(f"{where}: {s!r} is a synonym of both {lookup[s]!r} and {lab!r}")
                lookup[s] = lab
        object.__setattr__(self, "_lookup", lookup)

    def __hash__(self) -> int:  # the dict fields are not hashable; name + labels identify a taxonomy
        return hash((self.name, self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return isinstance(label, str) and self.canonical(label) is not None

    def canonical(self, text: str) -> str | None:
        """The canonical label a label or synonym names (case and punctuation tolerant), else None."""
        return self._lookup.get(normalize_label(text))  # type: ignore[attr-defined]

    def index(self, label: str) -> int:
        canon = self.canonical(label)
        if canon is None:
            raise KeyError(f"{label!r} is not a label of taxonomy {self.name!r}: {list(self.labels)}")
        return self.labels.index(canon)

    def labels_with_valence(self, valence: str) -> tuple[str, ...]:
        return tuple(lab for lab in self.labels if self.valence[lab] == valence)

    def to_dict(self) -> dict[str, Any]:
        """The JSON/TOML structure `load_taxonomy` reads."""
        out = []
        for lab in self.labels:
            row: dict[str, Any] = {"name": lab, "valence": self.valence[lab]}
            if self.arousal[lab] is not None:
                row["arousal"] = self.arousal[lab]
            if self.synonyms[lab]:
                row["synonyms"] = list(self.synonyms[lab])
            if lab in self.parents:
                row["parent"] = self.parents[lab]
            out.append(row)
        return {"name": self.name, "labels": out}


def _make(name: str, rows: Iterable[tuple], parents: Mapping[str, str] | None = None) -> Taxonomy:
    """rows: (label, valence, arousal, synonyms...)."""
    rows = list(rows)
    return Taxonomy(
        name=name,
        labels=tuple(r[0] for r in rows),
        valence={r[0]: r[1] for r in rows},
        arousal={r[0]: r[2] for r in rows},
        synonyms={r[0]: tuple(r[3:]) for r in rows},
        parents=dict(parents or {}),
    )


MIKELS8 = _make("mikels8", [
    ("amusement", "positive", "high", "amused", "amusing", "fun", "funny", "humor", "humour"),
    ("anger", "negative", "high", "angry", "mad", "furious", "rage", "fury"),
    ("awe", "positive", "low", "awed", "awestruck", "wonder", "amazement", "awe inspiring"),
    ("contentment", "positive", "low", "content", "contented", "calm", "peaceful", "peace", "serenity",
     "satisfaction", "satisfied"),
    ("disgust", "negative", "low", "disgusted", "disgusting", "revulsion", "gross"),
    ("excitement", "positive", "high", "excited", "exciting", "thrill", "thrilled", "thrilling"),
    ("fear", "negative", "high", "afraid", "scared", "fearful", "frightened", "terror", "scary"),
    ("sadness", "negative", "low", "sad", "sorrow", "unhappy", "grief", "melancholy"),
])

EMOTION6 = _make("emotion6", [
    ("anger", "negative", "high", "angry", "mad", "furious", "rage"),
    ("disgust", "negative", "low", "disgusted", "disgusting", "revulsion"),
    ("fear", "negative", "high", "afraid", "scared", "fearful", "frightened", "terror"),
    ("joy", "positive", "high", "happy", "happiness", "joyful", "glad", "delight"),
    ("sadness", "negative", "low", "sad", "sorrow", "unhappy", "grief"),
    ("surprise", "neutral", "high", "surprised", "astonished", "astonishment", "amazed"),
])

BINARY = _make("binary", [
    ("positive", "positive", None, "pos", "positive emotion", "positive valence"),
    ("negative", "negative", None, "neg", "negative emotion", "negative valence"),
])

WEBEMO2 = _make("webemo2", [("positive", "positive", None, "pos"), ("negative", "negative", None, "neg")])

WEBEMO7 = _make("webemo7", [
    ("love", "positive", None, "loving"),
    ("joy", "positive", None, "happy", "happiness", "joyful"),
    ("surprise", "neutral", None, "surprised"),
    ("confusion", "negative", None, "confused"),
    ("sadness", "negative", None, "sad"),
    ("anger", "negative", None, "angry"),
    ("fear", "negative", None, "afraid", "scared"),
])

# (leaf, parent in Parrott's tree [unconfirmed for WebEmo, see module docstring], valence of the parent)
_WEBEMO25 = [
    ("affection", "love"), ("cheerfulness", "joy"), ("confusion", "confusion"), ("contentment", "joy"),
    ("disappointment", "sadness"), ("disgust", "anger"), ("enthrallment", "joy"), ("envy", "anger"),
    ("exasperation", "anger"), ("gratitude", "love"), ("horror", "fear"), ("irritability", "anger"),
    ("lust", "love"), ("neglect", "sadness"), ("nervousness", "fear"), ("optimism", "joy"), ("pride", "joy"),
    ("rage", "anger"), ("relief", "joy"), ("sadness", "sadness"), ("shame", "sadness"), ("suffering", "sadness"),
    ("surprise", "surprise"), ("sympathy", "sadness"), ("zest", "joy"),
]
_WEBEMO25_SPELLINGS = {"cheerfulness": ("cheerfullness",), "irritability": ("irritabilty",)}
WEBEMO25 = _make(
    "webemo25",
    [(leaf, WEBEMO7.valence[parent], None, *_WEBEMO25_SPELLINGS.get(leaf, ())) for leaf, parent in _WEBEMO25],
    parents=dict(_WEBEMO25),
)

# the label sets of the video emotion datasets (emor3.data.video_loaders), in their split files' order: valence as the
# datasets' papers group them (neutral for neutral and surprise), arousal unset (neither dataset rates it). Named by
# get_taxonomy, but not among BUILTIN_NAMES (the image taxonomies a manifest's labels are matched against).
DFEW7 = _make("dfew7", [
    ("happy", "positive", None, "happiness"), ("sad", "negative", None, "sadness"),
    ("neutral", "neutral", None), ("angry", "negative", None, "anger"), ("surprise", "neutral", None, "surprised"),
    ("disgust", "negative", None, "disgusted"), ("fear", "negative", None, "fearful", "afraid"),
])
MAFW11 = _make("mafw11", [
    ("anger", "negative", None, "angry"), ("disgust", "negative", None), ("fear", "negative", None),
    ("happiness", "positive", None, "happy"), ("neutral", "neutral", None), ("sadness", "negative", None, "sad"),
    ("surprise", "neutral", None, "surprised"), ("contempt", "negative", None), ("anxiety", "negative", None),
    ("helplessness", "negative", None), ("disappointment", "negative", None),
])
VIDEO_NAMES = ("dfew7", "mafw11")

_BUILTIN = {t.name: t for t in (MIKELS8, EMOTION6, BINARY, WEBEMO2, WEBEMO7, WEBEMO25)}
_ALIASES = {"mikels": "mikels8", "emoset": "mikels8", "fi": "mikels8", "artphoto": "mikels8",
            "abstract": "mikels8", "webemo": "webemo25", "emotion 6": "emotion6"}
BUILTIN_NAMES = tuple(_BUILTIN)
_BUILTIN.update({t.name: t for t in (DFEW7, MAFW11)})


def get_taxonomy(name: str | Taxonomy) -> Taxonomy:
    """A built-in taxonomy by name or alias, a Taxonomy passed through, or a TOML/JSON file path."""
    if isinstance(name, Taxonomy):
        return name
    key = normalize_label(name).replace(" ", "") if name else ""
    key = _ALIASES.get(key, key)
    if key in _BUILTIN:
        return _BUILTIN[key]
    path = Path(str(name))
    if path.suffix.lower() in (".toml", ".json") or path.is_file():
        return load_taxonomy(path)
    raise KeyError(f"unknown taxonomy {name!r}: built-in ones are {list(BUILTIN_NAMES)} (aliases "
                   f"{sorted(_ALIASES)}), or give a .toml / .json file")


def load_taxonomy(path: str | Path) -> Taxonomy:
    """A user taxonomy from a TOML or JSON file (structure in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"taxonomy file {path} does not exist")
    if path.suffix.lower() == ".toml":
        doc = load_toml(path, "taxonomy file")
    else:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    return taxonomy_from_dict(doc, source=str(path))


def taxonomy_from_dict(doc: Any, *, source: str = "dict") -> Taxonomy:
    """A Taxonomy from the `{"name": ..., "labels": [{"name", "valence", ...}, ...]}` structure."""
    if not isinstance(doc, dict) or not isinstance(doc.get("labels"), list):
        raise ValueError(f"{source}: a taxonomy needs a 'labels' list of tables (name, valence, ...)")
    name = str(doc.get("name") or Path(source).stem)
    rows, parents = [], {}
    for i, row in enumerate(doc["labels"]):
        if not isinstance(row, dict) or "name" not in row:
            raise ValueError(f"{source}: labels[{i}] must be a table with at least 'name' and 'valence', got {row!r}")
        lab = normalize_label(row["name"])
        if "valence" not in row:
            raise ValueError(f"{source}: label {lab!r} has no 'valence' (positive, negative or neutral); "
                             f"mappings between taxonomies go through it")
        unknown = set(row) - {"name", "valence", "arousal", "synonyms", "parent"}
        if unknown:
            raise ValueError(f"{source}: label {lab!r} has unknown keys {sorted(unknown)}")
        syn = row.get("synonyms", [])
        if isinstance(syn, str) or not isinstance(syn, list):
            raise ValueError(f"{source}: label {lab!r}: 'synonyms' must be a list of strings")
        rows.append((lab, str(row["valence"]).lower(), row.get("arousal"), *syn))
        if row.get("parent"):
            parents[lab] = normalize_label(row["parent"])
    try:
        t = _make(name, rows, parents)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return Taxonomy(t.name, t.labels, t.synonyms, t.valence, t.arousal, t.parents, source=source)


# ---------------------------------------------------------------------------------------------------------------
# mappings through valence


def _canon(label: str, taxonomy: Taxonomy) -> str:
    canon = taxonomy.canonical(label)
    if canon is None:
        raise KeyError(f"{label!r} is not a label of taxonomy {taxonomy.name!r}: {list(taxonomy.labels)}")
    return canon


def to_binary(label: str, taxonomy: str | Taxonomy) -> str | None:
    """"positive" / "negative" for a label of `taxonomy`; None for a neutral label (e.g. surprise)."""
    taxonomy = get_taxonomy(taxonomy)
    v = taxonomy.valence[_canon(label, taxonomy)]
    return None if v == "neutral" else v


def map_label(label: str, src: str | Taxonomy, dst: str | Taxonomy) -> tuple[str, ...]:
    """The labels of `dst` that `label` (of `src`) corresponds to.

    The same name (or a dst synonym of it) wins: Mikels' anger -> Emotion6's anger; then the label's parent in a
    hierarchy (`src.parents`, e.g. WebEmo-25 -> WebEmo-7). Otherwise every dst label of the same valence, in dst order: Mikels' amusement -> Emotion6 (joy,); Emotion6 joy -> Mikels' four positive labels.
    A neutral label maps to dst's neutral labels (possibly none).
    """
    src, dst = get_taxonomy(src), get_taxonomy(dst)
    canon = _canon(label, src)
    same = dst.canonical(canon)
    if same is not None and dst.valence[same] == src.valence[canon]:
        return (same,)
    parent = dst.canonical(src.parents[canon]) if canon in src.parents else None
    if parent is not None:  # a hierarchy level: WebEmo-25 rage -> WebEmo-7 anger
        return (parent,)
    return dst.labels_with_valence(src.valence[canon])


def binary_correct(prediction: str | None, label: str, taxonomy: str | Taxonomy,
                   prediction_taxonomy: str | Taxonomy | None = None) -> bool | None:
    """Whether a predicted label has the valence of the true label (scoring any model on the binary level).

    prediction: a label or synonym of `prediction_taxonomy` (default: `taxonomy`), or of the binary taxonomy
    ("positive"/"negative"); anything unrecognised (or None) is wrong. Returns None when the true label is neutral,
    so it cannot be scored at this level.
    """
    taxonomy = get_taxonomy(taxonomy)
    truth = to_binary(label, taxonomy)
    if truth is None:
        return None
    if prediction is None:
        return False
    ptax = get_taxonomy(prediction_taxonomy) if prediction_taxonomy is not None else taxonomy
    for t in (ptax, BINARY):
        canon = t.canonical(prediction)
        if canon is not None:
            return t.valence[canon] == truth
    return False
