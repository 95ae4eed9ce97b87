"""Reward combination: preset arithmetic, NaN policy, plug-in loading and None handling."""

import math
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from emor3.rewards.combine import (
    WEIGHT_PRESETS,
    RewardBreakdown,
    combine,
    compute_rewards,
    load_reward_plugin,
    resolve_weights,
)

TAX = SimpleNamespace(name="mini", labels=["joy", "sadness"], synonyms={"happy": "joy"})
GOOD = "<step1>a</step1><step2>b</step2><step3>c</step3>\\boxed{joy}"
WRONG = "<step1>a</step1><step2>b</step2><step3>c</step3>\\boxed{sadness}"
NOFMT = "\\boxed{joy}"
SYN = "<step1></step1><step2>b</step2><step3>c</step3>\\boxed{happy}"


def test_presets_match_paper_formulas():
    acc = torch.tensor([1.0, 0.0, 1.0, 0.0])
    cons = torch.tensor([1.0, 0.5, 0.0, 1.0])
    coh = torch.tensor([0.0, 1.0, 0.5, 1.0])
    fmt = torch.tensor([1.0, 1.0, 0.0, 0.0])
    comps = {"accuracy": acc, "consistency": cons, "coherence": coh, "format": fmt}
    paper = 0.8 * acc + 0.1 * (cons + coh) / 2 + 0.1 * fmt  # docs/method.md "Rewards", total (paper)
    release = 0.8 * acc + 0.1 * cons + 0.1 * coh + 0.1 * fmt  # docs/method.md "Rewards", total (authors' release)
    torch.testing.assert_close(combine(comps, resolve_weights("paper")), paper, msg="paper preset arithmetic wrong")
    torch.testing.assert_close(combine(comps, resolve_weights("release")), release, msg="release preset wrong")
    assert combine({k: torch.ones(1) for k in comps}, WEIGHT_PRESETS["release"]).item() == pytest.approx(1.1)
    assert resolve_weights("accuracy=1,format=0.5") == {"accuracy": 1.0, "format": 0.5}
    with pytest.raises(ValueError, match="preset"):
        resolve_weights("papper")


def test_compute_rewards_end_to_end_and_logging():
    texts = [GOOD, WRONG, NOFMT, SYN]
    refl = {"consistency": torch.tensor([1.0, 0.0, 0.5, 1.0]), "coherence": torch.tensor([1.0, 1.0, 0.0, 0.5])}
    rb = compute_rewards(texts, ["joy"] * 4, taxonomies=TAX, reflection=refl)
    assert isinstance(rb, RewardBreakdown) and rb.total.shape == (4,) and rb.total.dtype == torch.float32
    exp = [0.8 + 0.05 * 2 + 0.1, 0.05 + 0.1, 0.8 + 0.025, 0.05 * 1.5 + 0.1]
    torch.testing.assert_close(rb.total, torch.tensor(exp), msg="compute_rewards total != hand-computed paper total")
    assert set(rb.names) == {"accuracy", "format", "consistency", "coherence"}
    assert rb.extras["format_strict"].tolist() == [1, 1, 0, 0], "strict format must be logged beside the paper's"
    assert rb.extras["accuracy_normalized"].tolist() == [1, 0, 1, 1], "normalized accuracy must be logged too"
    m = rb.metrics()
    assert m["reward/accuracy"] == pytest.approx(0.5) and m["reward/unscorable"] == 0
    # options switch which variant is weighted
    rb2 = compute_rewards(texts, ["joy"] * 4, taxonomies=TAX, reflection=refl, weights="accuracy=1,format=1",
                          strict_format=True, normalized_accuracy=True)
    assert rb2.total.tolist() == [2.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no reflection scores"):
        compute_rewards(texts, ["joy"] * 4, weights="paper")
    assert compute_rewards(texts, ["joy"] * 4, weights="accuracy=0.8,format=0.1").total.shape == (4,)


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length_bonus(prompts, completions, **kwargs):
            assert len(prompts) == len(completions) == len(kwargs["label"])
            return [None if c.startswith("\\\\boxed") else len(c) / 100 for c in completions]

        def label_echo(prompts, completions, label, taxonomy, **kwargs):
            return [1.0 if l in p else 0.0 for p, l in zip(prompts, label)]

        def always_none(prompts, completions, **kwargs):
            return [None] * len(completions)

        def wrong_length(prompts, completions, **kwargs):
            return [1.0]

        def returns_text(prompts, completions, **kwargs):
            return ["high"] * len(completions)

        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_plugin_loading_and_none_handling(plugin_module):
    p = load_reward_plugin("my_rewards:length_bonus=0.5")
    assert p.name == "length_bonus" and p.weight == 0.5
    texts = [GOOD, NOFMT]
    rb = compute_rewards(texts, ["joy", "joy"], weights="accuracy=1", plugins=[p])
    lb = rb.components["length_bonus"]
    assert lb[0].item() == pytest.approx(len(GOOD) / 100) and math.isnan(lb[1].item()), "None must become NaN"
    # skip (TRL nansum): the NaN plug-in drops out of row 1, which keeps its accuracy term
    assert rb.total.tolist() == pytest.approx([1 + 0.5 * len(GOOD) / 100, 1.0])
    # all weighted components NaN -> NaN total even under skip (so group_advantages gives it advantage 0)
    with pytest.warns(RuntimeWarning, match="always_none"):
        rb = compute_rewards(texts, ["joy", "joy"], weights="accuracy=0",
                             plugins=[load_reward_plugin("my_rewards:always_none")])
    assert torch.isnan(rb.total).all() and rb.metrics()["reward/unscorable"] == 2
    # prompts and columns reach the function as lists of N
    echo = load_reward_plugin("my_rewards:label_echo", weight=2.0)
    rb = compute_rewards(texts, ["joy", "sadness"], weights="accuracy=0", plugins=[echo],
                         prompts=["pick joy", "pick joy"], columns={"id": ["a", "b"]})
    assert rb.total.tolist() == [2.0, 0.0]


def test_plugin_bad_specs_have_clear_errors(plugin_module):
    with pytest.raises(ValueError, match="module:function"):
        load_reward_plugin("my_rewards.length_bonus")
    with pytest.raises(ImportError, match="no_such_module"):
        load_reward_plugin("no_such_module:f")
    with pytest.raises(AttributeError, match="nope"):
        load_reward_plugin("my_rewards:nope")
    with pytest.raises(TypeError, match="not a function"):
        load_reward_plugin("my_rewards:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match="not a number"):
        load_reward_plugin("my_rewards:length_bonus=heavy")
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        compute_rewards([GOOD, GOOD], ["joy", "joy"], weights="accuracy=1",
                        plugins=[load_reward_plugin("my_rewards:wrong_length")])
    with pytest.raises(TypeError, match="row 0"):
        compute_rewards([GOOD, GOOD], ["joy", "joy"], weights="accuracy=1",
                        plugins=[load_reward_plugin("my_rewards:returns_text")])


def test_all_nan_plugin_warns_once_is_counted_and_can_fail(plugin_module, monkeypatch):
    import warnings
    # the package re-exports the function `combine`, which hides the module of the same name
    monkeypatch.setattr(sys.modules["emor3.rewards.combine"], "_warned_all_nan", set())
    dead = load_reward_plugin("my_rewards:always_none=0.5")
    texts, labels = [GOOD, WRONG, NOFMT], ["joy"] * 3
    with pytest.warns(RuntimeWarning, match=r"'my_rewards:always_none=0\.5' returned None/NaN for all 3"):
        rb = compute_rewards(texts, labels, weights="accuracy=1", plugins=[dead])
    assert rb.total.tolist() == [1.0, 0.0, 1.0], "skip policy: the dead plug-in adds nothing"
    m = rb.metrics()
    assert m["reward/always_none_nan_rows"] == 3 and m["reward/accuracy_nan_rows"] == 0, \
        "unscored rows of each component must be in the metrics, so a dead plug-in shows in the logs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second batch must not warn again
        compute_rewards(texts, labels, weights="accuracy=1", plugins=[dead])
    with pytest.raises(ValueError, match=r"always_none.*None/NaN for all 3"):
        compute_rewards(texts, labels, weights="accuracy=1", plugins=[dead], on_all_nan="error")
    # a plug-in that scores some rows is not all-NaN: no warning, no error
    partial = load_reward_plugin("my_rewards:length_bonus")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rb = compute_rewards(texts, labels, weights="accuracy=1", plugins=[partial], on_all_nan="error")
    assert rb.metrics()["reward/length_bonus_nan_rows"] == 1
    with pytest.raises(ValueError, match="on_all_nan"):
        compute_rewards(texts, labels, on_all_nan="ignore")
