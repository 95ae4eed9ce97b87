"""The paper's two-setting table (python -m emor3.evaluate table) from runs' results.json, checked against the
paper's own Table 1 (Qwen2.5-VL-3B, G = 4): its A^I / A^O / A are reproduced from its six per-set scores."""

import json

import pytest

from emor3.evaluate import RUN_AVERAGES, format_table, main, paper_table, summary_scores, write_results

# the paper's Table 1, G = 4: (EmoSet^I, Emo6, WebEmo) trained on EmoSet, (Emo6^I, EmoSet, WebEmo) on Emotion6
PAPER = {
    "initial": ((51.55, 50.00, 40.65), (50.00, 51.55, 40.65), (50.77, 45.71, 47.40)),  # zero-shot
    "grpo": ((74.60, 60.10, 49.50), (70.88, 59.90, 44.85), (72.74, 53.59, 59.97)),
    "emo_r3": ((75.50, 60.44, 50.45), (70.71, 60.70, 45.20), (73.10, 54.20, 60.50)),
}


def _row(trained_on: str, scores) -> dict:
    names = ("emoset", "emotion6", "webemo") if trained_on == "emoset" else ("emotion6", "emoset", "webemo")
    sets = {n: {"domain": "in" if i == 0 else "out", "n": 100, "accuracy": a, "format_rate": 100.0, "cue_rate": None}
            for i, (n, a) in enumerate(zip(names, scores))}
    return {"sets": sets, **summary_scores(sets)}


def _runs(tmp_path):
    """Four run folders as training writes them: emo_r3 and grpo, each trained on EmoSet and on Emotion6, each
    with the starting point's row (the zero-shot model) first."""
    dirs = {}
    for algo in ("emo_r3", "grpo"):
        for k, setting in enumerate(("emoset", "emotion6")):
            d = tmp_path / f"{algo}_{setting}"
            d.mkdir()
            write_results({"initial": _row(setting, PAPER["initial"][k]), algo: _row(setting, PAPER[algo][k])}, d)
            dirs[algo, setting] = d
    return dirs


def test_per_run_averages_are_named_as_the_runs_own():
    sets = _row("emoset", PAPER["emo_r3"][0])["sets"]
    s = summary_scores(sets)
    assert RUN_AVERAGES == ("run A^I", "run A^O", "run A") and set(s) == set(RUN_AVERAGES)
    assert s["run A^I"] == 75.50 and s["run A^O"] == pytest.approx((60.44 + 50.45) / 2)
    head = format_table({"emo_r3": {"sets": sets, **s}}).splitlines()[0]
    assert "| run A^I | run A^O | run A |" in head and "| A^I |" not in head


def test_table_reproduces_the_papers_averages(tmp_path):
    dirs = _runs(tmp_path)
    order = [dirs["emo_r3", "emoset"], dirs["emo_r3", "emotion6"], dirs["grpo", "emoset"], dirs["grpo", "emotion6"]]
    runs = [(str(d), json.loads((d / "results.json").read_text())) for d in order]
    t = paper_table(runs)
    assert [(s["name"], s["in"], s["out"]) for s in t["settings"]] == [
        ("emoset", ["emoset"], ["emotion6", "webemo"]), ("emotion6", ["emotion6"], ["emoset", "webemo"])]
    assert list(t["rows"]) == ["initial", "emo_r3", "grpo"]
    for model, (on_emoset, on_emotion6, (a_in, a_out, a_all)) in PAPER.items():
        r = t["rows"][model]
        assert [c[2] for c in r["cells"]] == list(on_emoset + on_emotion6)
        # hand-computed: 2 in-domain, 4 out-of-domain, all 6 cells, each counted once
        assert r["A^I"] == pytest.approx((on_emoset[0] + on_emotion6[0]) / 2)
        assert r["A^O"] == pytest.approx((sum(on_emoset[1:]) + sum(on_emotion6[1:])) / 4)
        assert r["A"] == pytest.approx((sum(on_emoset) + sum(on_emotion6)) / 6)
        # and, printed as the table prints them, they are the paper's averages
        assert [float(f"{r[k]:.2f}") for k in ("A^I", "A^O", "A")] == [a_in, a_out, a_all], model
    assert t["notes"] == [f"initial trained on emoset: taken from {order[0]}; also in {order[2]}",
                          f"initial trained on emotion6: taken from {order[1]}; also in {order[3]}"]


def test_table_command_writes_markdown(tmp_path, capsys):
    dirs = _runs(tmp_path)
    out = tmp_path / "table.md"
    main(["table", str(dirs["emo_r3", "emoset"]), str(dirs["emo_r3", "emotion6"] / "results.json"),
          "--rows", "emo_r3,initial", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert capsys.readouterr().out.strip() == out.read_text().strip()
    assert lines[0].startswith("Settings: trained on emoset: columns 1-3") and "trained on emotion6: columns 4-6" in lines[0]
    assert lines[2] == "| Model | emoset^I | emotion6 | webemo | emotion6^I | emoset | webemo | A^I | A^O | A |"
    assert lines[4] == "| emo_r3 | 75.50 | 60.44 | 50.45 | 70.71 | 60.70 | 45.20 | 73.10 | 54.20 | 60.50 |"
    assert lines[5] == "| initial | 51.55 | 50.00 | 40.65 | 50.00 | 51.55 | 40.65 | 50.77 | 45.71 | 47.40 |"


def test_results_written_before_the_rename_still_read(tmp_path):
    dirs = _runs(tmp_path)
    old = tmp_path / "old.json"  # per-run averages under their former names
    rows = json.loads((dirs["emo_r3", "emotion6"] / "results.json").read_text())
    for r in rows.values():
        for new, former in zip(RUN_AVERAGES, ("A^I", "A^O", "A")):
            r[former] = r.pop(new)
    old.write_text(json.dumps(rows))
    runs = [("a", json.loads((dirs["emo_r3", "emoset"] / "results.json").read_text())), ("b", rows)]
    assert paper_table(runs)["rows"]["emo_r3"]["A"] == pytest.approx(60.50)


def test_a_row_missing_a_setting_gets_no_averages(tmp_path):
    dirs = _runs(tmp_path)
    runs = [(str(d), json.loads((d / "results.json").read_text()))
            for d in (dirs["emo_r3", "emoset"], dirs["grpo", "emotion6"])]
    t = paper_table(runs)
    assert t["rows"]["emo_r3"]["A^I"] is None and t["rows"]["emo_r3"]["cells"][3][2] is None
    assert t["rows"]["initial"]["A"] == pytest.approx(47.40, abs=0.005), "the shared row is complete"
    assert "emo_r3: some settings or sets are missing, so its averages are left out" in t["notes"]


def test_bad_inputs_are_named(tmp_path, capsys):
    dirs = _runs(tmp_path)
    with pytest.raises(SystemExit):  # one setting only
        main(["table", str(dirs["emo_r3", "emoset"]), str(dirs["grpo", "emoset"])])
    assert "two or more training settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["table", str(dirs["emo_r3", "emoset"]), str(tmp_path / "nowhere")])
    assert "nowhere: no such results.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"emo_r3": {"sets": {"emoset": {"domain": "inside", "accuracy": 1.0}}}}))
    with pytest.raises(SystemExit):
        main(["table", str(dirs["emo_r3", "emoset"]), str(bad)])
    assert "bad.json: row 'emo_r3' set 'emoset' needs a domain" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["table", str(dirs["emo_r3", "emoset"]), str(dirs["emo_r3", "emotion6"]), "--rows", "dapo"])
    assert "row 'dapo' is in none of the runs" in capsys.readouterr().err
