"""A run folder is never lost: settings are checked before anything is touched, a folder holding a run is never
replaced without --overwrite, checkpoints survive a SIGKILL at any point of a save and resume bit for bit, and
metrics.jsonl / samples.jsonl are rolled back to the checkpoint on resume.

The SIGKILL test kills a real training process (``EMOR3_FAULT_AT=N``, the hook ``emor3.models.checkpoint.
fault_point``) at a seeded, evenly spread sample of the write / rename points of its saves, resumes it, and
compares the finished run with an uninterrupted one. ``make test`` runs ``EMOR3_FAULT_CASES`` (default 2) kill
points; ``make check-faults`` runs 24.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emor3.config import config_from_dict, parse_args
from emor3.checkpoints import POINTER, latest_checkpoint, list_checkpoints, save_checkpoint
from emor3.grpo.train import train
from emor3.stages.grpo import MetricsSink, StopFlag, rollback_jsonl
from test_train import TINY

REPO = Path(__file__).resolve().parents[1]


def _parse(argv):
    return parse_args(argv, "emor3-test", "")


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2, "a bad setting is a usage error (exit status 2)"
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("argv, names", [
    (["--steps", "-3"], ["--grpo.steps", "[grpo] steps", ">= 1"]),
    (["--grpo.group-size", "1"], ["--grpo.group-size", "[grpo] group_size", ">= 2"]),
    (["--grpo.temperature", "0"], ["--grpo.temperature", "> 0", "NaN"]),
    (["--grpo.top-p", "0"], ["--grpo.top-p", "> 0 and <= 1"]),
    (["--grpo.top-p", "1.5"], ["--grpo.top-p", "<= 1"]),
    (["--grpo.mini-batch-prompts", "0"], ["--grpo.mini-batch-prompts", ">= 1"]),
    (["--grpo.prompts-per-step", "6", "--grpo.mini-batch-prompts", "4"],
     ["--grpo.prompts-per-step", "multiple of --grpo.mini-batch-prompts (4)"]),
    (["--model.dtype", "foo"], ["--model.dtype", "float32, bfloat16, float16"]),
    (["--run.logger", "foo"], ["--run.logger", "jsonl, tensorboard, wandb"]),
    (["--grpo.kl-kind", "k4"], ["--grpo.kl-kind", "k1, k2, k3"]),
    (["--grpo.dual-clip", "0.5"], ["--grpo.dual-clip", "> 1"]),
    (["--reward.plugin-all-nan", "ignore"], ["--reward.plugin-all-nan", "warn, error"]),
    (["--run.keep-checkpoints", "0"], ["--run.keep-checkpoints", ">= 1"]),
    (["--model.device", "gpu"], ["--model.device", "cuda:N"]),
    (["--reward.weights", "accuracy"], ["--reward.weights", "NAME=W"]),
])
def test_a_bad_setting_is_a_usage_error_naming_it(argv, names, capsys):
    err = _usage_error(argv, capsys)
    for name in names:
        assert name in err, f"{name!r} missing from:\n{err}"


def test_every_bad_setting_is_reported_at_once_and_toml_keys_are_named(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[grpo]\ngroup_size = 1\nsteps = 0\n")
    err = _usage_error(["--config", str(tmp_path / "bad.toml")], capsys)
    assert "[grpo] group_size" in err and "[grpo] steps" in err


def test_the_defaults_and_the_examples_are_valid():
    _parse([])
    for toml in sorted((REPO / "examples").glob("*.toml")):  # recipes naming the user's checkpoints and datasets
        parse_args(["--config", str(toml)], "emor3-test", "", check_paths=False)
    assert _parse(["--eval.temperature", "0"]).eval.temperature == 0, "evaluation at T = 0 is greedy: allowed"


def test_resume_continues_the_run_in_its_own_folder(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.toml").write_text('[run]\nout = "elsewhere"\n')
    assert _parse(["--resume", str(tmp_path / "a")]).run.out == str(tmp_path / "a")
    err = _usage_error(["--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")], capsys)
    assert "continues the run in its own folder" in err


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def _fake_run(folder: Path) -> dict:
    (folder / "checkpoint-1" / "model").mkdir(parents=True)
    (folder / "checkpoint-1" / "model" / "config.json").write_text("{}")
    (folder / "checkpoint-1" / "model" / "model.safetensors").write_bytes(b"weights")
    (folder / "checkpoint-1" / "trainer_state.pt").write_bytes(b"state")
    (folder / "config.toml").write_text("[run]\n")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "results.md").write_text("| table |\n")
    return _snapshot(folder)


def _run(args, cwd, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_no_command_touches_a_folder_holding_a_run(tmp_path, monkeypatch, capsys):
    """Each entry point has its own default folder and refuses a non-empty one (saying which flag to use); a bad
    setting fails before anything is written. The folders stay byte-identical."""
    from emor3 import evaluate, sft
    from emor3.grpo import train as grpo_train

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    before = {}
    for name in ("default", "sft", "eval"):
        (runs / name).mkdir(parents=True)
        before[name] = _fake_run(runs / name)
    cases = [
        (grpo_train.main, [], "runs/default", ["--resume runs/default", "--overwrite"]),
        (grpo_train.main, ["--model.dtype", "foo", "--overwrite"], "--model.dtype", ["float32"]),
        (grpo_train.main, ["--grpo.prompts-per-step", "3", "--grpo.mini-batch-prompts", "2"],
         "--grpo.prompts-per-step", ["multiple"]),
        (sft.main, [], "runs/sft", ["--overwrite"]),
        (evaluate.main, [], "runs/eval", ["--overwrite"]),
        (evaluate.main, ["--eval.top-p", "0", "--overwrite"], "--eval.top-p", ["> 0"]),
    ]
    for main, argv, named, hints in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, f"{main.__module__} {argv}: exit {e.value.code}\n{err}"
        assert named in err and all(h in err for h in hints), f"{main.__module__} {argv}:\n{err}"
    for name in before:
        assert _snapshot(runs / name) == before[name], f"runs/{name} was changed"
    assert sorted(p.name for p in runs.iterdir()) == ["default", "eval", "sft"]


def test_the_entry_point_exits_2_before_writing(tmp_path):
    before = _fake_run(tmp_path)
    r = _run(["-m", "emor3.grpo.train", "--out", str(tmp_path), "--steps", "-3", "--overwrite"], REPO)
    assert r.returncode == 2 and "--grpo.steps" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ runs


def _tiny(tmp_path: Path, out: Path, **sections):
    d = {k: dict(v) for k, v in TINY.items()}
    d["data"]["cache_dir"] = str(tmp_path / "emoscenes")
    d["sft"]["steps"] = 0
    d["run"].update(out=str(out), save_every=1, keep_checkpoints=2, threads=1, sample_every=1)
    for sec, values in sections.items():
        d.setdefault(sec, {}).update(values)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """One tiny run of 3 GRPO steps, a checkpoint after every step, the newest 2 kept."""
    root = tmp_path_factory.mktemp("three")
    cfg = _tiny(root, root / "run", grpo={"steps": 3})
    train(cfg)
    return root, cfg


def test_numbered_checkpoints_a_pointer_and_the_last_k(three_steps):
    root, cfg = three_steps
    out = Path(cfg.run.out)
    assert [s for s, _ in list_checkpoints(out)] == [2, 3], "the newest --run.keep-checkpoints are kept"
    assert (out / POINTER).read_text() == "checkpoint-3\n"
    assert latest_checkpoint(out) == out / "checkpoint-3"
    assert torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=True)["step"] == 3
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"], "no temporary file is left"


def test_resume_ignores_and_cleans_what_an_interrupted_save_left(three_steps, tmp_path):
    root, cfg = three_steps
    out = tmp_path / "run"
    shutil.copytree(cfg.run.out, out)
    (out / ".checkpoint-4.tmp" / "model").mkdir(parents=True)  # a save killed while writing
    (out / ".checkpoint-2.trash").mkdir()  # a prune killed while deleting
    (out / "checkpoint-9" / "model").mkdir(parents=True)  # a half-written numbered folder
    (out / "checkpoint-9" / "model" / "config.json").write_text("{}")
    (out / f".{POINTER}.tmp").write_text("checkpoint-")
    assert latest_checkpoint(out) == out / "checkpoint-3", "incomplete folders are never resumed from"
    train(_parse(["--resume", str(out), "--grpo.steps", "4"]))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name or p.name.startswith(".")) == [
        ".lock", "checkpoint-3", "checkpoint-4", "checkpoint-9.damaged"], "an incomplete checkpoint is set aside"
    assert (out / POINTER).read_text() == "checkpoint-4\n"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_resume_with_nothing_left_to_train_still_finishes_the_interrupted_save(three_steps, tmp_path):
    """Killed in the last save after checkpoint-3 got its name: the pointer still names checkpoint-2, its
    temporary file and the checkpoint to prune are still there. Resuming (no step left) completes the save."""
    root, cfg = three_steps
    out = tmp_path / "run"
    shutil.copytree(cfg.run.out, out)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-1")
    (out / POINTER).write_text("checkpoint-2\n")
    (out / f".{POINTER}.tmp").write_text("checkpoint-3\n")
    train(_parse(["--resume", str(out), "--grpo.steps", "3"]))
    assert (out / POINTER).read_text() == "checkpoint-3\n"
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_a_second_ctrl_c_during_a_save_waits_for_the_save(three_steps, tmp_path, monkeypatch):
    import emor3.checkpoints as checkpoints
    import emor3.models.checkpoint as checkpoint
    from emor3.models import load_pretrained

    root, cfg = three_steps
    src = latest_checkpoint(Path(cfg.run.out))
    model = load_pretrained(src / "model")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    calls = []

    def two_interrupts(what):  # SIGINT twice, in the middle of writing the weights
        calls.append(what)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(checkpoint, "fault_point", two_interrupts)
    monkeypatch.setattr(checkpoints, "fault_point", two_interrupts)
    stop = StopFlag()
    try:
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C still stops the process, after the save
            save_checkpoint(model, tmp_path, 7, opt, sched, {"epoch": 0, "position": 0}, keep=cfg.run.keep_checkpoints,
                            tokenizer_dir=src / "model", base=src / "model", base_sha256=None)
    finally:
        stop.restore()
    assert stop.signal == signal.SIGINT
    assert len(calls) > 10 and calls[-1] == "renamed the pointer", "the save ran to its end"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-7"
    back = load_pretrained(tmp_path / "checkpoint-7" / "model").state_dict()
    assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())


def test_a_failed_save_gives_the_signal_handlers_back(tmp_path, monkeypatch):
    """A save that raises (a full disk) ends the run with its error, and SIGINT / SIGTERM are handled as before the
    run again: a later Ctrl-C or kill in the same process is not swallowed by a loop that is gone."""
    import emor3.stages.grpo as grpo_stage

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(grpo_stage, "save_checkpoint", disk_full)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(OSError, match="No space left"):
        train(_tiny(tmp_path, tmp_path / "run", grpo={"steps": 1}))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_metrics_are_rolled_back_and_a_cut_line_is_dropped(tmp_path, capsys):
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # a crash mid-write
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s, "completion": "x"}) + "\n" for s in (1, 1, 2, 3)))
    sink = MetricsSink(tmp_path, resume_step=2)
    sink.log(3, {"loss": 0.5})
    sink.log_samples(3, [{"completion": "y"}])
    sink.close()
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 0.5}]
    samples = [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [1, 1, 2, 3]
    assert "partial line" in capsys.readouterr().out
    # nothing to roll back: the file is left byte for byte
    before = (tmp_path / "metrics.jsonl").read_bytes()
    rollback_jsonl(tmp_path / "metrics.jsonl", 5)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


DEAD = '''
def dead(prompts, completions, **kw):
    return [float("nan")] * len(completions)
'''


def test_a_dead_plugin_stops_the_run_when_asked(tmp_path, monkeypatch):
    (tmp_path / "emor3_dead_plugin.py").write_text(DEAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _tiny(tmp_path, tmp_path / "run", grpo={"steps": 1},
                reward={"plugins": ["emor3_dead_plugin:dead=1.0"], "plugin_all_nan": "error"})
    with pytest.raises(ValueError, match="dead.*returned None/NaN for all"):
        train(cfg)


# ------------------------------------------------------------------------------------------------ SIGKILL


VOLATILE = ("time/", "tokens_per_s", "peak_memory_mb")  # wall-clock and memory readings differ run to run


def _records(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _finished_state(out: Path) -> dict:
    ckpt = latest_checkpoint(out)
    from safetensors.torch import load_file

    return {"name": ckpt.name, "weights": load_file(ckpt / "model" / "model.safetensors"),
            "state": torch.load(ckpt / "trainer_state.pt", weights_only=True),
            "metrics": _records(out / "metrics.jsonl"), "samples": _records(out / "samples.jsonl"),
            "results": json.loads((out / "results.json").read_text())}


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def kill_schedule(points: int, cases: int, seed: int = 0) -> list[int]:
    """``cases`` kill points in 1..points, one drawn (seeded) from each of ``cases`` equal slices: spread over the
    whole of the saves, first write to last rename."""
    rng = random.Random(seed)
    edges = [1 + round(i * points / cases) for i in range(cases + 1)]
    return [rng.randrange(lo, max(lo + 1, hi)) for lo, hi in zip(edges, edges[1:])]


def test_sigkill_at_any_point_of_a_save_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Each case: a training process continuing a run from step 1 to 3 (a save after each step) is killed with
    SIGKILL at one point of its saves, then resumed to the end; the result equals the uninterrupted run's bit for
    bit (weights, optimizer and RNG state, metrics, samples, evaluation). The killed runs are subprocesses; the
    reference and the resumes run in this process (the same code and one thread, so the same numbers)."""
    cases = int(os.environ.get("EMOR3_FAULT_CASES", "2"))
    base = tmp_path / "base"
    train(_tiny(tmp_path, base, grpo={"steps": 1}))  # step 1 and its checkpoint: where every case starts

    def resume(folder: Path):
        train(_parse(["--resume", str(folder), "--grpo.steps", "3"]))

    # the uninterrupted continuation, counting the fault points of its saves (steps 2 and 3)
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    log = tmp_path / "points.log"
    with monkeypatch.context() as m:
        m.setenv("EMOR3_FAULT_LOG", str(log))
        resume(ref)
    points = [line.split("\t")[1] for line in log.read_text().splitlines()]
    assert len(points) >= 20, f"the saves have {len(points)} write / rename points"
    reference = _finished_state(ref)
    assert reference["name"] == "checkpoint-3" and [m["step"] for m in reference["metrics"]] == [1, 2, 3]

    schedule = kill_schedule(len(points), cases)
    print(f"{len(points)} fault points in the saves of steps 2 and 3; killing at {schedule}")
    for n in schedule:
        case = tmp_path / f"kill{n}"
        shutil.copytree(base, case)
        r = _run(["-m", "emor3.grpo.train", "--resume", str(case), "--grpo.steps", "3"], REPO,
                 {"EMOR3_FAULT_AT": str(n)})
        where = f"killed at point {n}/{len(points)} ({points[n - 1]})"
        assert r.returncode == -signal.SIGKILL, f"{where}: exit {r.returncode}\n{r.stderr[-2000:]}"
        resume(case)
        _assert_equal(_finished_state(case), reference, where)
        assert not [p.name for p in case.iterdir() if p.name.startswith(".") and p.name != ".lock"], f"{where}: leftovers"
        assert (case / POINTER).read_text() == "checkpoint-3\n", f"{where}: the pointer"
        assert [s for s, _ in list_checkpoints(case)] == [2, 3], f"{where}: the kept checkpoints"
