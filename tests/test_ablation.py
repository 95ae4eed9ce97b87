"""benchmarks/ablation.py: seeds run in separate processes merge into the report one process would write; the
statistics against hand-computed values; the README's and RESULTS.md's tables are the committed artifacts' report."""

import json
import sys
from pathlib import Path

import pytest

from emor3.evaluate import paired_t_interval, sign_test, t_quantile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import ablation  # noqa: E402


def _row(acc_in: float, acc_out: float, recall: float, halluc: float) -> dict:
    sets = {"test": {"accuracy": acc_in, "n": 400, "format_rate": 99.0, "cue_recall": recall, "hallucinated": halluc},
            "ood_render": {"accuracy": acc_out, "n": 200, "format_rate": 90.0, "cue_recall": recall,
                           "hallucinated": halluc}}
    return {"sets": sets, "run A^I": acc_in, "run A^O": acc_out, "run A": (acc_in + acc_out) / 2}


def _methods() -> dict:
    """One seed's rows: Cold-Start SFT, GRPO and EMO-R3."""
    return {"Cold-Start SFT": _row(40, 20, 50, 30), "GRPO": _row(50, 22, 45, 35), "EMO-R3": _row(52, 24, 60, 20)}


def _part(tmp_path: Path, name: str, seeds: list[int], rows: list[dict], bench: str = "shortcut",
          started: float | None = None) -> Path:
    path = tmp_path / name / "ablation.json"
    path.parent.mkdir()
    part = {"seeds": seeds, "rows": {bench: rows}, "paired": {}, "command": f"run {name}",
            "wall_s": 60.0 * len(seeds), "threads": 1, "loads": [1.0, 2.0]}
    if started is not None:
        part.update(started=started, ended=started + part["wall_s"])
    path.write_text(json.dumps(part))
    return path


def test_merge_reports_every_seed_of_every_part(tmp_path):
    per_seed = [{"Cold-Start SFT": _row(40, 20, 50, 30), "GRPO": _row(50 + s, 22, 45, 35),
                 "EMO-R3": _row(52, 24, 60, 20)} for s in range(3)]
    a = _part(tmp_path, "a", [0, 2], [per_seed[0], per_seed[2]])
    b = _part(tmp_path, "b", [1], [per_seed[1]])
    md = tmp_path / "RESULTS.md"
    md.write_text(f"before\n{ablation.MARK_BEGIN}\nstale table\n{ablation.MARK_END}\nafter\n")
    text = ablation.merge([a, b], md)
    assert "### shortcut (3 seeds)" in text and "Seeds: shortcut 0,1,2;" in text, "rows sorted by seed"
    # EMO-R3 - GRPO per seed, in seed order: in-domain 52 - (50 + s); 3 seeds: a range, no interval
    assert "| run A^I | 51.0 | 52.0 | +1.0 | range of 3 seeds [+0.0, +2.0] | – | 2 of 2 > 0, p = 0.5 | " \
           "+2.0, +1.0, +0.0 |" in text
    assert "| cue recall | 45.0 | 60.0 | +15.0 | range of 3 seeds [+15.0, +15.0] | – |" in text
    assert "| GRPO | 51.0 (range 50.0 to 52.0) |" in text, "fewer than 5 seeds: the range, named as such"
    written = md.read_text()
    assert written.startswith("before\n") and written.endswith("after\n") and "stale table" not in written
    assert text in written


def test_merge_keeps_each_benchmarks_seeds_and_the_whole_wall_time(tmp_path):
    """Parts that ran one benchmark each, one after another: each table names its own seeds, and the wall time runs
    from the first start to the last end (here 0-5 min), not the longest part's; a part run after a pause adds its
    own time, not the pause."""
    a = _part(tmp_path, "a", [0, 1, 2], [_methods()] * 3, "shortcut", started=1000.0)  # 1000-1180 s
    b = _part(tmp_path, "b", [3, 4], [_methods()] * 2, "default", started=1180.0)  # 1180-1300 s
    text = ablation.merge([a, b], None)
    assert "Seeds: shortcut 0,1,2; default 3,4;" in text
    assert "### shortcut (3 seeds)" in text and "### default (2 seeds)" in text
    assert "wall time 5 min (5 process-minutes)" in text
    later = _part(tmp_path, "c", [5], [_methods()], "default", started=4000.0)  # 4000-4060 s, after a pause
    assert "wall time 6 min (6 process-minutes)" in ablation.merge([a, b, later], None)


def test_a_continued_part_keeps_the_time_of_its_earlier_invocations(tmp_path, monkeypatch):
    """A part stopped and run again by the same command records the stopped invocation (its span, wall time and
    loads) beside its own, and the merged report counts both spans and no pause; another command's file in the
    folder is not its past."""
    monkeypatch.setattr(ablation, "run_seed", lambda seed, out, bench, extra, chosen: _methods())
    out = tmp_path / "part"
    argv = ["--seeds", "0,1", "--benchmarks", "shortcut", "--out", str(out), "--results-md", ""]
    command = "python benchmarks/ablation.py " + " ".join(argv)
    out.mkdir()
    stopped = {"seeds": [0, 1], "rows": {"shortcut": [_methods()]}, "paired": {}, "command": command,
               "wall_s": 60.0, "started": 1000.0, "ended": 1060.0, "threads": 1, "loads": [3.0, 4.0]}
    (out / "ablation.json").write_text(json.dumps(stopped))
    ablation.main(argv)
    part = json.loads((out / "ablation.json").read_text())
    assert part["earlier"] == [{"started": 1000.0, "ended": 1060.0, "wall_s": 60.0, "loads": [3.0, 4.0]}]
    assert len(part["rows"]["shortcut"]) == 2 and part["started"] > 1060.0
    part.update(started=5000.0, ended=5120.0, wall_s=120.0, loads=[1.0])  # this invocation's span, pinned
    (out / "ablation.json").write_text(json.dumps(part))
    text = ablation.merge([out / "ablation.json"], None)
    assert "wall time 3 min (3 process-minutes)" in text and "load average (1 min) 1.0-4.0" in text
    other = argv[:-1] + ["-"]
    assert ablation.earlier_invocations(out / "ablation.json", "python benchmarks/ablation.py " + " ".join(other)) == []
    assert len(ablation.earlier_invocations(out / "ablation.json", command)) == 2  # its earlier one, then itself


def test_busy_time_is_the_union_of_the_spans():
    assert ablation.busy_time([(0, 10), (5, 20), (30, 40), (32, 35)]) == 30
    assert ablation.busy_time([(30, 40), (0, 10)]) == 20 and ablation.busy_time([]) == 0


def test_an_empty_results_md_writes_nowhere(tmp_path, monkeypatch, capsys):
    """--results-md "" (the form the docstring gives for parts run side by side) prints the report and writes no
    file: an empty path must not become the working folder."""
    a = _part(tmp_path, "a", [0], [_methods()])
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    ablation.main(["--merge", str(a), "--results-md", ""])
    assert "### shortcut (1 seeds)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_jobs_deal_the_seeds_in_turn():
    assert ablation.deal([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert ablation.deal([0, 1, 2], 3) == [[0], [1], [2]]
    assert ablation.deal([7], 4) == [[7]]


def test_jobs_a_failing_part_stops_the_ablation_and_names_its_log(tmp_path):
    """Each part runs in its own process with its own folder and log; a part whose runs fail (here: a flag the
    runs do not know) ends the ablation with its log's path, and nothing is merged into RESULTS.md."""
    md = tmp_path / "RESULTS.md"
    md.write_text("untouched\n")
    try:
        ablation.main(["--jobs", "2", "--seeds", "0,1", "--benchmarks", "shortcut", "--out", str(tmp_path / "abl"),
                       "--results-md", str(md), "--extra", "--no-such-flag", "1"])
    except SystemExit as e:
        message = str(e)
    else:
        raise AssertionError("the ablation went on after its parts failed")
    for k in (0, 1):
        log = tmp_path / "abl" / f"part{k}" / "log.txt"
        assert str(log) in message and "no-such-flag" in log.read_text()
    assert md.read_text() == "untouched\n"


def test_selection_choices_reach_each_method_and_a_record_without_them_stops_the_run(tmp_path, monkeypatch):
    """--selection: the Cold-Start step count goes to the run that trains it (EMO-R3's), each method's own learning
    rate to that method's run with the grid's step budget, all before --extra (so --extra still wins); a record
    whose learning-rate grid has not finished ends the ablation with the file's name before anything runs."""
    rec = {"sft_choice": 1600, "lr_choice": {"grpo": "1e-4", "dapo": "5e-4", "emo_r3": "3e-4"}, "grpo_steps": 150}
    (tmp_path / "sel.json").write_text(json.dumps(rec))
    calls = {}

    def fake_train(algo, seed, out, extra, *more):
        calls[algo] = [*more, *extra]
        return {algo: {"sets": {}}, "Cold-Start SFT": {"sets": {}}}

    monkeypatch.setattr(ablation, "_train", fake_train)
    chosen = ablation.chosen_settings(tmp_path / "sel.json")
    ablation.run_seed(0, tmp_path, "shortcut", ["--grpo.steps", "5"], chosen)
    assert calls["emo_r3"][:6] == ["--sft.steps", "1600", "--grpo.lr", "3e-4", "--grpo.steps", "150"] and \
        calls["emo_r3"][-2:] == ["--grpo.steps", "5"]
    assert calls["grpo"][:4] == ["--grpo.lr", "1e-4", "--grpo.steps", "150"] and "--sft.steps" in calls["grpo"]
    assert calls["grpo"][calls["grpo"].index("--sft.steps") + 1] == "0"
    (tmp_path / "half.json").write_text(json.dumps({"sft_choice": 1600, "lr_choice": {"grpo": "1e-4"}}))
    with pytest.raises(SystemExit, match=r"half.json: the selection record has no choice of the dapo learning "
                                         r"rate, the emo_r3 learning rate"):
        ablation.main(["--seeds", "0", "--out", str(tmp_path / "abl"), "--selection", str(tmp_path / "half.json")])
    assert not (tmp_path / "abl").exists()


def test_statistics_hand_values():
    # the shortcut variant's format differences: mean 17.1, sd sqrt(1275.96 / 4) = 17.860, t_{0.975, 4} = 2.7764,
    # half-width 2.7764 * 17.860 / sqrt(5) = 22.176
    d = [24.7, 45.0, 8.8, 2.8, 4.2]
    mean, lo, hi = paired_t_interval(d, [0.0] * 5)
    assert mean == pytest.approx(17.1) and lo == pytest.approx(-5.076, abs=1e-3) and hi == pytest.approx(39.276, abs=1e-3)
    assert sign_test(d, [0.0] * 5) == (5, 5, pytest.approx(0.0625)), "5 of 5 positive: p = 2 / 2^5"
    assert sign_test([1, 2, -3, 0], [0, 0, 0, 0]) == (2, 3, pytest.approx(1.0)), "a zero difference is left out"
    assert sign_test([1] * 8 + [-1], [0] * 9)[2] == pytest.approx(2 * 10 / 512), "P(<= 1 of 9) = (1 + 9) / 512"
    # Student-t quantiles from the printed tables
    for df, q in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (7, 2.3646), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)


def test_no_interval_from_fewer_than_five_seeds():
    assert ablation.mean_ci([10.0, 20.0, 30.0]) == "20.0 (range 10.0 to 30.0)"
    assert ablation.mean_ci([10.0, 20.0, 30.0, 40.0, 50.0]).startswith("30.0 [")
    three = ablation.paired_stats([3.0, 1.0, 2.0], [0.0, 0.0, 0.0])
    assert not three["intervals"] and "ci" not in three and "t_ci" not in three and three["range"] == [1.0, 3.0]
    five = ablation.paired_stats([24.7, 45.0, 8.8, 2.8, 4.2], [0.0] * 5)
    assert five["intervals"] and five["t_ci"] == pytest.approx([-5.076, 39.276], abs=1e-3)
    assert five["ci"][0] > 0 > five["t_ci"][0], "the bootstrap interval excludes 0 where the t-interval does not"


def _block(text: str, begin: str, end: str) -> str:
    assert begin in text and end in text, f"markers {begin} / {end} missing"
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_readme_and_results_tables_are_the_artifacts_report():
    """`python benchmarks/ablation.py --report` regenerates both from each study's committed ablation.json parts
    (benchmarks/ablation_runs, benchmarks/main_runs, benchmarks/mechanism_runs/study), with the training rollouts'
    table where their samples.jsonl are committed: a table edited by hand, or an artifact changed without
    regenerating them, fails here."""
    assert ablation.artifact_paths(), "no committed ablation artifacts"
    readme = (REPO / "README.md").read_text()
    results = (REPO / "benchmarks" / "RESULTS.md").read_text()
    for study in ablation.STUDIES:
        paths = ablation.artifact_paths(study.folder)
        if not paths:
            assert not _block(results, study.begin, study.end).strip(), f"{study.name}: a block without artifacts"
            continue
        full, short = ablation.report_texts(paths, study.primary)
        assert full in _block(results, study.begin, study.end), \
            f"RESULTS.md's {study.name} tables differ from `python benchmarks/ablation.py --report`"
        if ablation.has_rollouts(study.folder):
            assert ablation.rollouts_report(study.folder) in _block(results, study.begin, study.end)
        if study.name == ablation.README_STUDY:
            assert _block(readme, ablation.README_BEGIN, ablation.README_END).strip() == f"```\n{short}\n```", \
                "README's ablation tables differ from `python benchmarks/ablation.py --report`"


def test_paired_t_test_and_holm_hand_values():
    from emor3.evaluate import holm, paired_t_test

    mean, t, p = paired_t_test([1, 2, 3, 4, 5], [0] * 5)  # mean 3, s = sqrt(2.5), t = 3 / sqrt(0.5)
    assert (mean, t) == pytest.approx((3.0, 4.242641)) and p == pytest.approx(0.013236, abs=1e-6)
    # d = 1, -2, .5, 1.5: mean 0.25, s^2 = 7.25 / 3, t_3 = 0.25 / (s / 2) = 0.3216
    _, t, p = paired_t_test([2.0, -1.0, 0.5, 1.5], [1.0, 1.0, 0.0, 0.0])
    assert t == pytest.approx(0.321634, abs=1e-6) and p == pytest.approx(0.768837, abs=1e-5)
    assert paired_t_test([1, 1], [0, 0])[1:] == (float("inf"), 0.0) and paired_t_test([1, 1], [1, 1])[1:] == (0.0, 1.0)
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 0.04): each in its place
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.03, 0.2, 0.01]) == pytest.approx([0.06, 0.2, 0.03])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _primary_rows(comp: float, agree: float, halluc: float) -> dict:
    sets = {"test": {"accuracy": 90.0, "agreement": agree, "hallucinated": halluc},
            "compositional": {"accuracy": comp, "agreement": agree, "hallucinated": halluc}}
    return {"sets": sets, "run A^I": 90.0, "run A^O": comp, "run A": (90.0 + comp) / 2}


def _primary_seeds(d_comp, d_agree, d_hall) -> list[dict]:
    return [{"GRPO": _primary_rows(60.0, 70.0, 10.0), "EMO-R3": _primary_rows(60.0 + c, 70.0 + g, 10.0 + h)}
            for c, g, h in zip(d_comp, d_agree, d_hall)]


def test_preregistered_comparisons_are_tested_with_holm_from_eight_seeds_and_need_the_predicted_sign():
    """P1 (compositional, EMO-R3 > GRPO) clearly positive: shown. P2 (agreement, EMO-R3 > GRPO) clearly negative:
    not shown however small its p. P3 (hallucination, EMO-R3 < GRPO) at a t-test p of 0.028: shown where it is the
    largest of the three p's (Holm multiplies it by 1), not where P1's p is larger (by 2: 0.056). Fewer than 8
    seeds: not tested."""
    d_agree = [-3.0, -4.0, -2.0, -5.0, -3.5, -4.5, -2.5, -3.0]
    d_hall = [-2.0, 0.5, -3.0, -1.5, 0.5, -2.5, -1.0, -1.0]
    text, out = ablation.primary_table(_primary_seeds([5.0, 6.0, 4.0, 7.0, 5.5, 6.5, 4.5, 5.0], d_agree, d_hall),
                                       "default")
    assert out["P1"]["verdict"] == "shown" and out["P1"]["diff"] == pytest.approx(5.4375)
    assert out["P2"]["p"] < 1e-4 and out["P2"]["verdict"] == "not shown", "the wrong sign is never shown"
    assert out["P3"]["p"] == pytest.approx(0.028161, abs=1e-6) and out["P3"]["p_holm"] == out["P3"]["p"]
    assert out["P3"]["verdict"] == "shown"
    assert "| P1 | compositional accuracy | EMO-R3 > GRPO | 60.0 | 65.4 | +5.4 |" in text
    assert " | shown | +5.0, +6.0, +4.0, +7.0, +5.5, +6.5, +4.5, +5.0 |\n" in text, "the differences per seed"
    _, weak = ablation.primary_table(_primary_seeds([2.0, -1.0, 3.0, -2.0, 1.0, 0.5, -1.5, 1.0], d_agree, d_hall),
                                     "default")
    assert weak["P1"]["p"] > 0.2 and weak["P1"]["verdict"] == "not shown"
    assert weak["P3"]["p_holm"] == pytest.approx(2 * weak["P3"]["p"]) and weak["P3"]["verdict"] == "not shown"
    text, few = ablation.primary_table(_primary_seeds([5.0] * 5, d_agree[:5], d_hall[:5]), "default")
    assert all(v["verdict"] == "not tested (5 of 8 seeds)" and "p" not in v for v in few.values())
    assert "| P1 | compositional accuracy | EMO-R3 > GRPO | 60.0 | 65.0 | +5.0 | range of 5 seeds [+5.0, +5.0] | – | – |" \
        in text, "below 8 seeds: no t interval, no p"


def test_report_writes_every_study_s_block_and_the_readme_from_its_study(tmp_path):
    legacy, main = tmp_path / "legacy", tmp_path / "main"
    legacy.mkdir(), main.mkdir()
    _part(tmp_path, "a", [0, 1], [_methods(), _methods()]).rename(legacy / "a.json")
    rows = [{"Cold-Start SFT": _primary_rows(50.0, 60.0, 9.0), "GRPO": _primary_rows(60.0, 70.0, 10.0),
             "EMO-R3": _primary_rows(60.0 + k, 71.0, 9.0 - k)} for k in range(3)]
    _part(tmp_path, "b", [3, 4, 5], rows, bench="default").rename(main / "b.json")
    studies = (ablation.Study("ablation", legacy, "<!-- a:begin -->", "<!-- a:end -->", "## A\n\n", False),
               ablation.Study("main", main, "<!-- m:begin -->", "<!-- m:end -->", "## M\n\n", True),
               ablation.Study("none", tmp_path / "empty", "<!-- n:begin -->", "<!-- n:end -->", "## N\n\n", True))
    results, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    readme.write_text(f"x\n{ablation.README_BEGIN}\n{ablation.README_END}\n")
    ablation.write_report(results, readme, studies, readme_study="main")
    md = results.read_text()
    assert "## A\n" in md and "## M\n" in md and "## N" not in md, "a study without artifacts is left out"
    block = md.split("<!-- m:begin -->")[1].split("<!-- m:end -->")[0]
    assert "Preregistered comparisons, default" in block and "not tested (3 of 8 seeds)" in block
    assert "Preregistered" not in md.split("<!-- a:begin -->")[1].split("<!-- a:end -->")[0]
    assert "Seeds: default 3,4,5" in readme.read_text() and "shortcut" not in readme.read_text()


def test_a_run_finished_with_the_same_settings_is_read_back_and_any_other_is_run(tmp_path, monkeypatch):
    """An ablation stopped part-way goes on where it stopped: a run whose folder holds results.json and a config.toml
    with the same settings (``run.progress`` and how the command is run aside) is read back; a different learning
    rate, a missing or cut-short results.json runs it."""
    from emor3.config import parse_args, save_config
    ran = []
    monkeypatch.setattr(ablation, "train", lambda cfg: ran.append(cfg.grpo.lr) or {"emo_r3": {"ran": True}})
    out = tmp_path / "seed0" / "emo_r3"
    out.mkdir(parents=True)
    flags = ["--grpo.lr", "3e-4", "--grpo.steps", "5"]
    saved = parse_args(["--algo", "emo_r3", "--seed", "0", "--out", str(out), "--run.progress", "true", *flags],
                       "ablation", "")
    save_config(saved.resolved(), out / "config.toml")
    assert ablation._train("emo_r3", 0, out, [], *flags) == {"emo_r3": {"ran": True}} and ran == [3e-4]
    (out / "results.json").write_text(json.dumps({"emo_r3": {"ran": False}}))
    assert ablation._train("emo_r3", 0, out, [], *flags) == {"emo_r3": {"ran": False}} and len(ran) == 1
    assert ablation._train("emo_r3", 0, out, [], "--grpo.lr", "1e-4", "--grpo.steps", "5")["emo_r3"]["ran"]
    assert ablation._train("emo_r3", 1, out, [], *flags)["emo_r3"]["ran"]  # another seed
    (out / "results.json").write_text('{"emo_r3": {"ran"')
    assert ablation._train("emo_r3", 0, out, [], *flags)["emo_r3"]["ran"] and len(ran) == 4


def test_rollout_reasoning_counts_hand_written_training_replies_per_window(tmp_path):
    """--rollouts: the evaluation's step-3 definitions on logged training replies, per step window. A frown under a
    night sky is negative and low arousal (sadness's): a step 3 saying so is correct and agrees with "sadness", a
    step 3 saying positive/high is wrong and disagrees with it but agrees with "excitement", and the degenerate
    "and low and low arousal" states no valence, so it is neither correct nor agreeing."""
    cues = {"face": "frown", "sky": "night", "object": "gift"}

    def reply(step, step3, answer, acc):
        return json.dumps({"step": step, "cues": cues, "label": "sadness", "taxonomy": "mikels8", "accuracy": acc,
                           "completion": f"<step1>A frowning face, a night sky and a gift.</step1><step2>Gloomy."
                                         f"</step2>{step3}\\boxed{{{answer}}}"})

    run = tmp_path / "seed0" / "dapo"
    run.mkdir(parents=True)
    (run / "samples.jsonl").write_text("\n".join([
        reply(10, "<step3>Negative valence and low arousal.</step3>", "sadness", 1.0),
        reply(10, "<step3>Positive valence and high arousal.</step3>", "sadness", 1.0),
        reply(60, "<step3>Positive valence and high arousal.</step3>", "excitement", 0.0),
        reply(60, "<step3> and low and low arousal.</step3>", "sadness", 1.0),
        reply(60, "", "sadness", 1.0),  # no step 3: counted as a reply only
        reply(200, "<step3>Negative valence and low arousal.</step3>", "sadness", 1.0)]) + "\n")
    first, second = ablation.rollout_reasoning(run / "samples.jsonl", [50, 100])
    assert first == {"steps": [1, 50], "replies": 2, "step3": 2, "step3_correct": 1, "judged": 2, "agreement": 1,
                     "correct": 2}
    assert second == {"steps": [51, 100], "replies": 3, "step3": 2, "step3_correct": 0, "judged": 2,
                      "agreement": 1, "correct": 2}
    text = ablation.rollouts_report(tmp_path, [50, 100])
    assert "| DAPO | 1-50 | 1 | 2 | 100.0 | 50.0 (50.0) | 50.0 (50.0) |" in text
    assert "| DAPO | 51-100 | 1 | 3 | 66.7 | 0.0 (0.0) | 50.0 (50.0) |" in text
    thirds = ablation.rollouts_report(tmp_path)  # windows: the thirds of the last logged step (200)
    assert "| DAPO | 1-67 | 1 | 5 |" in thirds and "| DAPO | 134-200 | 1 | 1 | 100.0 | 100.0 (100.0) |" in thirds
