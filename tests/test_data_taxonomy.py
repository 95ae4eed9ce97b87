"""Taxonomies: built-in label lists, canonicalisation, valence mappings, user files (TOML / JSON)."""

import json
import sys

import pytest

from emor3.data import (
    BINARY, EMOTION6, MIKELS8, WEBEMO7, WEBEMO25, Taxonomy, binary_correct, get_taxonomy, load_taxonomy, map_label,
    to_binary,
)
from emor3.rewards import accuracy_reward


def test_builtin_label_orders():
    assert MIKELS8.labels == ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear",
                              "sadness"), "Mikels order must match EmoSet/FI label indices"
    assert EMOTION6.labels == ("anger", "disgust", "fear", "joy", "sadness", "surprise")
    assert BINARY.labels == ("positive", "negative")
    assert WEBEMO7.labels == ("love", "joy", "surprise", "confusion", "sadness", "anger", "fear")
    assert len(WEBEMO25) == 25 and len(set(WEBEMO25.labels)) == 25
    assert set(WEBEMO25.parents.values()) <= set(WEBEMO7.labels), "every WebEmo leaf needs a 7-level parent"
    # the dataset's own misspellings must still load
    assert WEBEMO25.canonical("cheerfullness") == "cheerfulness"
    assert WEBEMO25.canonical("irritabilty") == "irritability"
    assert sum(MIKELS8.valence[x] == "positive" for x in MIKELS8.labels) == 4


def test_canonical_is_case_punctuation_and_synonym_tolerant():
    assert MIKELS8.canonical("  Amusement. ") == "amusement"
    assert MIKELS8.canonical("SCARED") == "fear"
    assert EMOTION6.canonical("happy") == "joy"
    assert MIKELS8.canonical("joy") is None, "joy is not a Mikels label; a silent mapping would hide data bugs"
    assert "awe" in MIKELS8 and "none" not in MIKELS8
    assert get_taxonomy("EmoSet") is MIKELS8 and get_taxonomy("FI") is MIKELS8


def test_synonym_clash_and_bad_valence_are_errors():
    with pytest.raises(ValueError, match="synonym of both"):
        Taxonomy("t", ("a", "b"), synonyms={"a": ("x",), "b": ("x",)}, valence={"a": "positive", "b": "negative"})
    with pytest.raises(ValueError, match="valence"):
        Taxonomy("t", ("a",), valence={"a": "good"})
    with pytest.raises(KeyError, match="mikels8"):
        get_taxonomy("nope")


def test_map_label_prefers_same_name_then_valence():
    assert map_label("anger", "mikels8", "emotion6") == ("anger",)
    assert map_label("amusement", "mikels8", "emotion6") == ("joy",)
    assert map_label("joy", "emotion6", "mikels8") == ("amusement", "awe", "contentment", "excitement")
    assert map_label("surprise", "emotion6", "mikels8") == (), "a neutral label has no Mikels counterpart"
    for lab in MIKELS8.labels:  # every Mikels label can be scored on Emotion6 and on the binary level
        assert map_label(lab, MIKELS8, EMOTION6)
        assert map_label(lab, MIKELS8, BINARY) == (MIKELS8.valence[lab],)
    assert map_label("rage", "webemo25", "webemo7") == ("anger",)


def test_binary_scoring_of_any_prediction():
    assert to_binary("awe", "mikels8") == "positive"
    assert to_binary("surprise", "emotion6") is None
    assert binary_correct("contentment", "awe", "mikels8") is True
    assert binary_correct("fear", "awe", "mikels8") is False
    assert binary_correct("positive", "awe", "mikels8") is True, "a binary answer scores against any taxonomy"
    assert binary_correct("happy", "amusement", "mikels8", prediction_taxonomy="emotion6") is True
    assert binary_correct("banana", "awe", "mikels8") is False and binary_correct(None, "awe", "mikels8") is False
    assert binary_correct("joy", "surprise", "emotion6") is None, "neutral truth is not scorable at binary level"
    assert binary_correct("surprise", "joy", "emotion6") is False


def test_user_taxonomy_toml_and_json(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text('name = "mine"\n[[labels]]\nname = "Happy"\nvalence = "positive"\narousal = "high"\n'
                    'synonyms = ["glad"]\n[[labels]]\nname = "gloomy"\nvalence = "negative"\n')
    t = load_taxonomy(toml)
    assert t.name == "mine" and t.labels == ("happy", "gloomy")
    assert t.canonical("Glad") == "happy" and t.arousal["gloomy"] is None
    js = tmp_path / "mine.json"
    js.write_text(json.dumps(t.to_dict()))
    t2 = get_taxonomy(str(js))
    assert (t2.labels, t2.valence, t2.synonyms) == (t.labels, t.valence, t.synonyms), "to_dict must round-trip"
    assert map_label("happy", t2, "emotion6") == ("joy",)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"labels": [{"name": "meh"}]}))
    with pytest.raises(ValueError, match=r"bad\.json.*'meh'.*valence"):
        load_taxonomy(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ValueError, match="broken.toml"):
        load_taxonomy(broken)


def test_toml_without_tomllib_or_tomli_gives_clear_error(tmp_path, monkeypatch):
    f = tmp_path / "t.toml"
    f.write_text('[[labels]]\nname = "a"\nvalence = "positive"\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10 without tomli installed
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(RuntimeError, match="tomli"):
        load_taxonomy(f)
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"labels": [{"name": "a", "valence": "positive"}]}))
    assert load_taxonomy(j).labels == ("a",), "JSON must work without any TOML reader"


def test_rewards_accept_taxonomy_synonyms():
    # emor3.rewards duck-types the taxonomy (labels + synonyms); synonyms count only with normalized=True
    assert accuracy_reward(r"<step1>a</step1><step2>b</step2><step3>c</step3>\boxed{Happy}", "joy", EMOTION6,
                           normalized=True) == 1.0
    assert accuracy_reward(r"\boxed{Happy}", "joy", EMOTION6) == 0.0
