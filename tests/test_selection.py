"""benchmarks/selection.py and benchmarks/precondition.py: the choice rules, the validation-only guards, running in
parts, the preregistered thresholds and the records' tables (no training here; each script runs in about a minute
with `--extra --config examples/quick.toml`)."""

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import precondition  # noqa: E402
import selection  # noqa: E402


def test_choose_the_best_mean_and_the_smaller_value_on_a_tie():
    scores = {100: [40.0, 44.0], 200: [50.0, 46.0], 300: [49.0, 47.0], 500: [30.0, 30.0]}
    assert selection.choose([100, 200, 300, 500], scores) == 200, "means 42, 48, 48, 30: the earlier of the tie"
    assert selection.choose(["1e-4", "3e-4"], {"1e-4": [10.0], "3e-4": [12.0]}) == "3e-4"
    assert selection.choose([1, 2], {2: [5.0]}) == 2, "a grid value without scores is not chosen"
    with pytest.raises(ValueError):
        selection.choose([1], {})


def test_a_run_that_read_anything_but_validation_is_refused():
    ok = {"sft": {"sets": {"validation": {"accuracy": 61.5}}}}
    assert selection.validation_accuracy(ok, "sft") == 61.5
    leaked = {"sft": {"sets": {"validation": {"accuracy": 61.5}, "test": {"accuracy": 60.0}}}}
    with pytest.raises(RuntimeError, match="validation only"):
        selection.validation_accuracy(leaked, "sft")
    assert selection.SELECT == ["--data.emoscenes-eval", "validation"]


def test_the_record_reports_the_curve_the_grid_and_the_choices(tmp_path):
    rec = {"command": "python benchmarks/selection.py", "seeds": [100, 101], "sft_steps": [100, 200],
           "lrs": ["1e-4", "3e-4"], "grpo_steps": 150,
           "sft": {"100": {"100": 40.0, "101": 44.0}, "200": {"100": 50.0, "101": 46.0}}, "sft_choice": 200,
           "grpo": {"grpo": {"1e-4": {"100": 60.0, "101": 64.0}, "3e-4": {"100": 70.0}}}, "lr_choice": {"grpo": "3e-4"}}
    text = selection.report(rec)
    assert "| 100 | 40.00 | 44.00 | 42.00 (range 40.00 to 44.00) |" in text
    assert "Chosen: 200 Cold-Start steps." in text
    assert "| grpo | 62.00 (range 60.00 to 64.00) | 70.00 | 3e-4 |" in text
    md = tmp_path / "RESULTS.md"
    md.write_text("head\n")
    selection.write_results_md(md, text)
    selection.write_results_md(md, text)
    assert md.read_text().count(selection.MARK_BEGIN) == 1 and md.read_text().startswith("head\n")


def test_points_finished_on_disk_are_read_and_claims_of_gone_processes_are_taken_over(tmp_path):
    """A selection in parts: a point with its result is not run again; a point claimed by a live process is left
    to it; a claim whose process is gone is taken over and run."""
    claims = tmp_path / "claims"
    done = tmp_path / "a.json"
    done.write_text("{}")
    ran = []
    dead = tmp_path / "b.json"
    claims.mkdir()
    (claims / "b").write_text("999999999")  # no such process
    selection.run_points([("a", done, lambda: ran.append("a")),
                          ("b", dead, lambda: (ran.append("b"), dead.write_text("{}")))], claims, poll_s=0)
    assert ran == ["b"] and not (claims / "b").exists()
    assert selection.claim(claims, "c") and selection.claim(claims, "c"), "a process holds its own claim"
    (claims / "d").write_text(str(os.getppid()))  # a live process that is not this one
    assert not selection.claim(claims, "d")


def test_the_precondition_reads_both_ends_of_validation_and_applies_the_preregistered_thresholds(tmp_path):
    def row(acc, hal, agree, a_ok, a_bad):
        return {"sets": {"validation": {"accuracy": acc, "hallucinated": hal, "agreement": agree, "no_step1": 0.0,
                                        "accuracy_badge_agrees": a_ok, "accuracy_badge_disagrees": a_bad}}}

    per = {}
    for seed, (hal_end, gap_end) in enumerate([(30.0, 10.0), (26.0, 12.0), (28.0, 20.0)]):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"Cold-Start SFT": row(40, 15.0, 80.0, 45, 40),
                                                      "grpo": row(50, hal_end, 78.0, 60, 60 - gap_end)}))
        per[str(seed)] = precondition.ends(run)
    v = precondition.verdict(per)
    assert v["hallucinated_rise"] == pytest.approx(13.0) and v["disagreement_rise"] == pytest.approx(2.0)
    assert v["badge_gap"] == pytest.approx(14.0) and v["holds"], "a 13-point hallucination rise meets the 10"
    per_low = {k: dict(r, hallucinated=[15.0, 20.0]) for k, r in per.items()}
    assert not precondition.verdict(per_low)["holds"], "5-point rise, 2-point disagreement, 14-point gap: none"
    assert not precondition.verdict(dict(list(per.items())[:2]))["holds"], "fewer than 3 seeds never holds"
    leaked = tmp_path / "leak"
    leaked.mkdir()
    r = row(1, 1, 1, 1, 1)
    r["sets"]["test"] = r["sets"]["validation"]
    (leaked / "results.json").write_text(json.dumps({"Cold-Start SFT": r, "grpo": r}))
    with pytest.raises(RuntimeError, match="validation only"):
        precondition.ends(leaked)
    assert "Precondition holds" in precondition.report({"command": "c", "variant": "conflict", "per_seed": per,
                                                       "verdict": v})


def test_the_readme_quotes_the_cold_start_curve_that_collect_rebuilds_from_the_committed_points(tmp_path):
    """`--collect` runs nothing: it rebuilds the record from the per-point results in --out. On a copy of
    benchmarks/selection_runs its means over seeds are the README's Cold-Start numbers, and 1600 steps is chosen."""
    shutil.copytree(REPO / "benchmarks" / "selection_runs", tmp_path / "runs")
    rec = selection.main(["--collect", "--stage", "sft", "--seeds", "100,101,102", "--sft-steps",
                          "100,200,300,500,800,1200,1600,2000", "--out", str(tmp_path / "runs")])
    means = {steps: sum(per.values()) / len(per) for steps, per in rec["sft"].items()}
    assert all(len(per) == 3 for per in rec["sft"].values()) and len(rec["sft"]) == 8
    assert not (tmp_path / "runs" / "claims").exists() or not any((tmp_path / "runs" / "claims").iterdir())
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"Cold-Start SFT scores {means['300']:.2f} % at 300 steps and {means['800']:.2f} % at 800, and " \
           f"{means['1600']:.2f} % at 1600, where its curve stopped improving ({means['2000']:.2f} % at 2000" in readme
    assert rec["sft_choice"] == 1600


@pytest.mark.parametrize("name", ["precondition", "precondition_v2", "precondition_v3", "precondition_v3_300",
                                  "precondition_v4"])
def test_results_md_shows_the_committed_precondition_record(name):
    """RESULTS.md's precondition tables (the conflict variant's versions 1 to 4) are `precondition.py --report` of
    the committed records, whose per-seed numbers are those of the committed results.json files; versions 1 to 3
    fail it and version 4 holds."""
    rec = json.loads((REPO / "benchmarks" / "mechanism_runs" / f"{name}.json").read_text())
    for seed in rec["seeds"]:
        assert precondition.ends(REPO / "benchmarks" / "mechanism_runs" / name / f"seed{seed}") == \
            rec["per_seed"][seed]
    assert precondition.verdict(rec["per_seed"]) == rec["verdict"]
    assert rec["verdict"]["holds"] == (name == "precondition_v4")
    md = (REPO / "benchmarks" / "RESULTS.md").read_text()
    block = md.split(f"<!-- {name}:begin -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0]
    assert block.strip() == precondition.report(rec).strip()


def test_a_resumed_precondition_run_takes_only_the_thread_and_step_counts_from_extra():
    """A resumed run keeps its own settings: of --extra it takes --run.threads and --grpo.steps (a finished run goes
    on to a larger budget), nothing else."""
    extra = ["--run.threads", "1", "--sft.steps", "1600", "--grpo.steps", "300", "--grpo.lr", "1e-4"]
    assert precondition.resume_flags(extra) == ["--run.threads", "1", "--grpo.steps", "300"]
    assert precondition.resume_flags(["--sft.steps", "1600"]) == []


def test_rollout_counts_sort_badge_answers_by_window_and_by_the_badge_s_distance(tmp_path):
    """Hand-built rollouts: on a smile-sunny-gift image (rule label amusement, neighbours excitement, contentment,
    anger) with the badge's label as the training label, a reply answers the badge or the cues; a reply on an
    agreeing image counts only as a reply (and as wrong when its label is not amusement)."""
    cues = {"face": "smile", "sky": "sunny", "object": "gift"}

    def row(step, label, answer):
        boxed = f"\\boxed{{{answer}}}" if answer else "no box"
        return {"step": step, "label": label, "cues": cues,
                "completion": f"<step1>x</step1><step2>y</step2><step3>z</step3>{boxed}"}

    rows = [row(10, "excitement", "excitement"),  # neighbour badge answered
            row(10, "excitement", "amusement"),  # neighbour badge, the cues answered
            row(20, "disgust", "disgust"),  # a farther badge answered: wrong, and not a neighbour
            row(30, "amusement", "anger"),  # agreeing image, a wrong neighbour answer
            row(30, "amusement", "amusement"),
            row(40, "contentment", None)]  # neighbour badge, no boxed answer: neither the badge nor wrong
    (tmp_path / "seed7").mkdir()
    (tmp_path / "seed7" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = precondition.rollout_counts(tmp_path / "seed7" / "samples.jsonl", [20, 40])
    assert first == {"steps": [1, 20], "replies": 3, "conflicting": 3, "badge": 2, "neighbour_conflicting": 2,
                     "neighbour_badge": 1, "far_conflicting": 1, "far_badge": 1, "wrong": 2, "wrong_neighbour": 1}
    assert second == {"steps": [21, 40], "replies": 3, "conflicting": 1, "badge": 0, "neighbour_conflicting": 1,
                      "neighbour_badge": 0, "far_conflicting": 0, "far_badge": 0, "wrong": 1, "wrong_neighbour": 1}
    table = precondition.rollouts_report(tmp_path)
    assert "| 7 | 1-40 | 6 | 2 / 4 | 1 / 3 | 1 / 1 | 3 | 2 |" in table, "no windows: one, to the last logged step"


@pytest.mark.parametrize("name, windows", [("precondition_v2", ""), ("precondition_v3_300", "60,150,300"),
                                           ("precondition_v4", "60,150")])
def test_results_md_counts_of_badge_answers_are_the_committed_rollouts(name, windows):
    """RESULTS.md's tables of badge answers are `precondition.py --rollouts` of the committed samples.jsonl files,
    and the prose quotes their sums."""
    text = precondition.main(["--rollouts", f"benchmarks/mechanism_runs/{name}", "--windows", windows])["rollouts"]
    md = (REPO / "benchmarks" / "RESULTS.md").read_text()
    block = md.split(f"<!-- rollouts_{name[13:]}:begin -->\n", 1)[1].split(f"<!-- rollouts_{name[13:]}:end -->", 1)[0]
    assert block.strip() == text.strip()
    prose = " ".join(md.split())
    if name == "precondition_v2":
        assert "| **all** | 1-150 | 720 | 3 / 360 | 3 / 200 | 0 / 160 | 21 | 21 |" in text
        assert "every wrong answer (21 of 21)" in prose and "3 of 200 replies" in prose and "0 of 160" in prose
    elif name == "precondition_v4":
        assert "| **all** | 1-60 | 288 | 18 / 192 |" in text and "| **all** | 61-150 | 432 | 67 / 320 |" in text
        assert "on 18 of 192 replies to conflicting images in the first 60 steps" in prose
    else:
        assert "| **all** | 1-60 | 288 | 0 / 120 |" in text and "| **all** | 61-150 | 432 | 19 / 240 |" in text
        assert "on 0 of 120 replies to conflicting images up to step 60, and on 19 of 240 from step 61" in prose
        assert "2 of 264 replies to conflicting images, against 24 of 200 (seed 200) and 51 of 280" in prose


def test_sft_from_starts_each_seed_from_the_earlier_run_s_cold_start_checkpoint(tmp_path, monkeypatch):
    """--sft-from FOLDER: each seed's GRPO run starts from FOLDER/grpo-seed<seed>/sft with no SFT of its own and the
    loss normaliser of a run that trained one (as selection's grid points), and its first row (named "initial" by
    such a run) is read as the start; a missing checkpoint is refused, naming the folder."""
    seen = {}

    def fake_train(cfg):
        seen[cfg.run.seed] = cfg
        row = {"sets": {"validation": {"accuracy": 50.0, "hallucinated": 1.0, "agreement": 90.0, "no_step1": 0.0,
                                       "accuracy_badge_agrees": 60.0, "accuracy_badge_disagrees": 40.0}}}
        Path(cfg.run.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.out) / "results.json").write_text(json.dumps({"initial": row, "grpo": row}))

    monkeypatch.setattr(precondition, "train", fake_train)
    earlier = tmp_path / "earlier"
    shipped = next((REPO / "emor3" / "assets" / "instruct").glob("*/config.json")).parent  # a checkpoint folder
    for seed in (5, 6, 7):
        shutil.copytree(shipped, earlier / f"grpo-seed{seed}" / "sft", ignore=shutil.ignore_patterns("*.safetensors"))
    rec = precondition.main(["--seeds", "5,6,7", "--out", str(tmp_path / "out"), "--sft-from", str(earlier),
                             "--extra", "--run.threads", "1"])
    assert sorted(seen) == [5, 6, 7] and rec["verdict"]["badge_gap"] == pytest.approx(20.0)
    for seed, cfg in seen.items():
        assert Path(cfg.model.path) == earlier / f"grpo-seed{seed}" / "sft"
        assert cfg.sft.steps == 0 and cfg.grpo.loss_scope == "mini-batch" and cfg.grpo.algo == "grpo"
        assert cfg.data.emoscenes_variant == "conflict" and cfg.data.emoscenes_eval == "validation"
    with pytest.raises(SystemExit, match="grpo-seed8/sft: no Cold-Start checkpoint"):
        precondition.main(["--seeds", "8", "--out", str(tmp_path / "out2"), "--sft-from", str(earlier)])


def test_the_budget_stage_checkpoints_every_count_and_chooses_among_the_counts_that_fit(tmp_path, monkeypatch):
    """--stage budget: one run per seed at the method's chosen rate from the chosen Cold-Start checkpoint, constant
    rate, a checkpoint at every count of the grid, each evaluated on validation; the choice is the best mean among
    the counts up to --budget-max (the smaller on a tie), never a larger count however well it scores."""
    out = tmp_path / "sel"

    def result(path: Path, name: str, acc: float) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps({name: {"sets": {"validation": {"accuracy": acc}}}}))

    for seed in (1, 2):  # the finished grids: Cold-Start at 8 steps, emo_r3 at two rates
        result(out / "sft" / "steps8" / f"seed{seed}" / "eval", "sft", 50.0)
        shutil.copytree(next((REPO / "emor3" / "assets" / "instruct").glob("*/config.json")).parent,
                        out / "sft" / "steps8" / f"seed{seed}" / "sft", ignore=shutil.ignore_patterns("*.safetensors"))
        for lr, acc in (("1e-4", 60.0), ("3e-4", 70.0)):
            result(out / "emo_r3" / f"lr{lr}" / f"seed{seed}", "emo_r3", acc)
            (out / "emo_r3" / f"lr{lr}" / f"seed{seed}" / "config.toml").write_text("[grpo]\nsteps = 3\n")
    trained, evaluated = [], []
    scores = {2: 80.0, 4: 85.0, 6: 85.0, 8: 99.0}  # the best (8) does not fit; 4 and 6 tie

    def fake_train(cfg):
        trained.append(cfg)
        return {"emo_r3": {"sets": {"validation": {"accuracy": 99.0}}}}

    def fake_evaluate(argv):
        k = int(Path(argv[argv.index("--model.path") + 1]).parent.name.split("-")[1])
        evaluated.append(argv)
        result(Path(argv[argv.index("--out") + 1]), "model", scores[k])

    monkeypatch.setattr(selection, "train", fake_train)
    monkeypatch.setattr(selection, "evaluate_main", fake_evaluate)
    rec = selection.main(["--stage", "budget", "--seeds", "1,2", "--sft-steps", "8", "--lrs", "1e-4,3e-4",
                          "--methods", "emo_r3", "--budget-steps", "2,4,6,8", "--budget-max", "6", "--out", str(out),
                          "--extra", "--run.threads", "1"])
    assert rec["lr_choice"] == {"emo_r3": "3e-4"} and rec["budget_choice"] == 4
    assert rec["grpo_steps"] == 3, "the record names the step count the grid's points ran, not today's default"
    assert rec["budget"]["8"] == {"1": 99.0, "2": 99.0}
    assert len(trained) == 2 and len(evaluated) == 8
    for cfg in trained:
        assert cfg.grpo.algo == "emo_r3" and cfg.grpo.lr == 3e-4 and cfg.grpo.steps == 8 and cfg.sft.steps == 0
        assert cfg.grpo.schedule == "constant" and cfg.grpo.warmup_steps == 0 and cfg.run.threads == 1
        assert cfg.run.save_every == 2 and cfg.run.keep_checkpoints == 4
        assert Path(cfg.model.path) == out / "sft" / "steps8" / f"seed{cfg.run.seed}" / "sft"
        assert cfg.data.emoscenes_eval == "validation"
    assert all(argv[argv.index("--data.emoscenes-eval") + 1] == "validation" for argv in evaluated)
    text = selection.report(rec)
    assert "| 8 | 99.00 | 99.00 | 99.00 (range 99.00 to 99.00) |" in text and "Chosen: 4 GRPO steps." in text


def test_collect_rebuilds_the_committed_record_and_results_md_shows_it(tmp_path):
    """The committed selection.json (what benchmarks/ablation.py --selection reads) is its own command's output on
    the committed points: the choices, the learning-rate grid's 150-step budget (read from the points' configs, not
    today's default) and every score; RESULTS.md's selection block is its report."""
    committed = json.loads((REPO / "benchmarks" / "selection_runs" / "selection.json").read_text())
    shutil.copytree(REPO / "benchmarks" / "selection_runs", tmp_path / "runs")
    argv = shlex.split(committed["command"])[2:]
    argv[argv.index("--out") + 1] = str(tmp_path / "runs")
    argv[argv.index("--results-md") + 1] = ""
    rec = selection.main(argv)
    keep = lambda r: {k: v for k, v in r.items() if k not in ("command", "started", "ended")}  # noqa: E731
    assert keep(rec) == keep(committed)
    assert (rec["sft_choice"], rec["grpo_steps"], rec["budget_choice"]) == (1600, 150, 75)
    results = (REPO / "benchmarks" / "RESULTS.md").read_text()
    block = results.split(selection.MARK_BEGIN, 1)[1].split(selection.MARK_END, 1)[0]
    assert selection.report(committed) in block
