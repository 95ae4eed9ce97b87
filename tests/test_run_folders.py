"""A run folder has one owner and one history; writers never overwrite what they were not given.

1. One owner: every writer holds ``FOLDER/.lock`` (``fcntl.flock``); a second process refuses naming the holder's PID,
   and a lock left by a killed process blocks nobody. Tested with real processes.
2. Resume is the same run: other settings are refused with a diff, the allowed ones are recorded with their step,
   and the starting model / KL reference must be the recorded ones (content hash).
3. Checkpoints survive a bad resume: a damaged newest checkpoint is skipped and set aside, never deleted, and the older
   one is not pruned before a newer one is written; ``--resume RUN/checkpoint-N``; kill points in SFT and in the final
   evaluation, after which the command the refusal names works.
4. traces and merge never overwrite their input or a foreign model; evaluation sets are the ones asked for.
5. Non-finite weights, the dry run's verdict, OS errors in one line.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emor3 import evaluate, sft
from emor3.config import save_config
from emor3.checkpoints import latest_checkpoint, list_checkpoints
from emor3.folders import RunFolderError, UsageError, folder_holder, lock_folder, unlock_folder
from emor3.grpo import train as grpo_train
from emor3.grpo.train import train
from emor3.models import load_pretrained, save_pretrained
from emor3.models.checkpoint import CheckpointError, content_hash
from emor3.config import parse_eval_spec
from emor3.stages.build import build_data, eval_requests
from emor3.toy.world import WORLD
from test_safety import REPO, _parse, _run, _tiny

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _snapshot(folder: Path) -> dict:
    """Every file's bytes under ``folder``, the lock file left out (its content is the last owner's PID)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in folder.rglob("*") if p.name != ".lock"}


def _refused(main, argv, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, f"{argv}: exit {e.value.code}\n{err}"
    assert "Traceback" not in err
    return err


def _start(args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _wait_for(cond, proc, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and not cond():
        assert proc.poll() is None, f"{what}: the process ended early\n{proc.stderr.read()[-3000:]}"
        time.sleep(0.3)
    assert cond(), f"{what}: timed out"


# ------------------------------------------------------------------------------------------------ 1. one owner


def test_a_live_run_owns_its_folder_and_a_killed_one_leaves_no_lock(tmp_path, capsys):
    """A training process is running. --overwrite, --resume, evaluate and SFT into its folder refuse, naming its
    PID, and leave the folder as it is; once it is killed (SIGKILL) the folder is free and resumes."""
    run = tmp_path / "run"
    cfg = _tiny(tmp_path, run, grpo={"steps": 1000})
    save_config(cfg, tmp_path / "cfg.toml")
    proc = _start(["-m", "emor3.grpo.train", "--config", str(tmp_path / "cfg.toml")])
    try:
        _wait_for(lambda: latest_checkpoint(run) is not None, proc, "the first checkpoint")
        assert folder_holder(run) == str(proc.pid)
        cases = [(grpo_train.main, ["--config", str(tmp_path / "cfg.toml"), "--overwrite"]),
                 (grpo_train.main, ["--resume", str(run)]),
                 (evaluate.main, ["--out", str(run), "--overwrite"]),
                 (sft.main, ["--out", str(run), "--overwrite"]),
                 (grpo_train.main, ["--config", str(tmp_path / "cfg.toml")])]  # no flag: not empty, in use
        for main, argv in cases:
            err = _refused(main, argv, capsys)
            assert f"process {proc.pid}" in err, f"{main.__module__} {argv} must name the owner's PID:\n{err}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert folder_holder(run) is None, "the OS drops the lock of a killed process"
    step = int(latest_checkpoint(run).name.split("-")[1])
    train(_parse(["--resume", str(run), "--grpo.steps", str(step)]))  # nothing left to train: evaluates
    assert (run / "results.json").is_file()


def test_two_runs_started_together_into_one_folder(tmp_path):
    """Two processes started at once with the same --run.out: one runs, the other refuses (exit 2) naming it; the
    folder holds one run (one seed in config.toml, whole lines in metrics.jsonl)."""
    run = tmp_path / "run"
    paths = []
    for seed in (1, 2):
        save_config(_tiny(tmp_path, run, grpo={"steps": 1}, run={"seed": seed}), tmp_path / f"s{seed}.toml")
        paths.append(tmp_path / f"s{seed}.toml")
    procs = [_start(["-m", "emor3.grpo.train", "--config", str(p)]) for p in paths]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], f"exit codes {codes}:\n" + "\n".join(o[1][-1500:] for o in outs)
    loser = [o for p, o in zip(procs, outs) if p.returncode == 2][0]
    winner = [p for p in procs if p.returncode == 0][0]
    assert f"process {winner.pid}" in loser[1], loser[1]
    seed = 1 if winner is procs[0] else 2
    assert f"seed = {seed}" in (run / "config.toml").read_text()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_the_lock_is_reentrant_and_released(tmp_path):
    lock_folder(tmp_path / "a", "test")
    lock_folder(tmp_path / "a", "test")  # the same process again: fine
    holder = _start(["-c", f"from emor3.folders import lock_folder; lock_folder({str(tmp_path / 'a')!r}, 'x')"])
    _, err = holder.communicate(timeout=60)
    assert holder.returncode != 0 and f"in use by process {os.getpid()}" in err
    unlock_folder(tmp_path / "a")
    assert folder_holder(tmp_path / "a") is None


def test_a_waiting_lock_takes_over_when_the_owner_ends(tmp_path, capsys):
    """The instruct stage cache waits (``wait=True``) instead of refusing: a second run of one setting reuses the
    first's checkpoint once it is written."""
    holder = _start(["-c", "import sys, time; from emor3.folders import lock_folder; "
                     "lock_folder(sys.argv[1], 'x', name='.key.lock'); print('locked', flush=True); time.sleep(2)",
                     str(tmp_path)])
    assert holder.stdout.readline().strip() == "locked"
    start = time.time()
    lock_folder(tmp_path, "instruct stage", wait=True, name=".key.lock")
    assert time.time() - start > 1.0 and holder.wait(timeout=30) == 0, "taken only once the owner had ended"
    assert f"in use by process {holder.pid}: waiting" in capsys.readouterr().out
    unlock_folder(tmp_path, name=".key.lock")
    holder.communicate(timeout=30)


# ------------------------------------------------------------------------------------------------ 2. same run


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A tiny run of 1 step with Cold-Start SFT (RUN/sft is its start model and KL reference)."""
    root = tmp_path_factory.mktemp("one")
    cfg = _tiny(root, root / "run", grpo={"steps": 1}, sft={"steps": 2})
    train(cfg)
    return root / "run"


def test_resume_refuses_other_settings_with_a_diff(one_step, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_step, run)
    before = _snapshot(run)
    with pytest.raises(RunFolderError) as e:
        train(_parse(["--resume", str(run), "--grpo.steps", "2", "--grpo.lr", "0.01", "--seed", "3"]))
    msg = str(e.value)
    assert "--grpo.lr ([grpo] lr): 0.001 in the run, 0.01 now" in msg and "--run.seed" in msg, msg
    assert "--grpo.steps" not in msg.split("Resume it as it is")[0], "extending --grpo.steps is allowed"
    assert f"python -m emor3.grpo.train --resume {run}" in msg and "--model" in msg, "commands that work"
    other = tmp_path / "grpo.toml"
    other.write_text('[grpo]\nalgo = "grpo"\n')
    with pytest.raises(RunFolderError, match=r"--grpo.algo / --algo \(\[grpo\] algo\): 'emo_r3' in the run, 'grpo' now"):
        train(_parse(["--resume", str(run), "--config", str(other)]))
    assert _snapshot(run) == before, "a refused resume changes nothing"
    # the named way to other settings: a new run from the checkpoint's weights (the run's own settings as the base)
    command = msg.split("start a new run from its weights: ")[1].split(" [settings]")[0].replace("NEW_DIR",
                                                                                                str(tmp_path / "new"))
    assert command.startswith("python -m emor3.grpo.train --model "), command
    grpo_train.main(command.split()[3:] + ["--config", str(run / "config.toml"), "--grpo.lr", "0.01"])
    assert json.loads((tmp_path / "new" / "lineage.json").read_text())["start_model"]["path"] == \
        str((run / "checkpoint-1" / "model").resolve())


def test_allowed_changes_are_recorded_with_their_step(one_step, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_step, run)
    train(_parse(["--resume", str(run), "--grpo.steps", "2", "--run.keep-checkpoints", "3"]))
    changes = [json.loads(x) for x in (run / "changes.jsonl").read_text().splitlines()]
    assert {"step": 1, "setting": "--grpo.steps", "was": 1, "now": 2} in changes
    assert {"step": 1, "setting": "--run.keep-checkpoints", "was": 2, "now": 3} in changes
    assert "steps = 2" in (run / "config.toml").read_text(), "config.toml holds the run's settings as they now are"


def test_resume_refuses_a_missing_or_changed_start_model(one_step, tmp_path):
    lineage = json.loads((one_step / "lineage.json").read_text())
    assert lineage["start_model"]["path"] == "sft" and lineage["reference"] == lineage["start_model"]
    assert lineage["start_model"]["sha256"] == content_hash(one_step / "sft")
    run = tmp_path / "run"
    shutil.copytree(one_step, run)
    (run / "sft" / "config.json").write_text((run / "sft" / "config.json").read_text() + "\n")
    with pytest.raises(RunFolderError, match="has changed since the run started"):
        train(_parse(["--resume", str(run)]))
    shutil.rmtree(run / "sft")  # the KL reference gone: the resume must not take the instruct / init model instead
    with pytest.raises(RunFolderError, match=r"KL reference|starting model.*missing"):
        train(_parse(["--resume", str(run)]))


# ------------------------------------------------------------------------------------------------ 3. bad resume


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    cfg = _tiny(root, root / "run", grpo={"steps": 2})
    train(cfg)
    return root / "run"


def test_a_damaged_newest_checkpoint_is_skipped_and_the_older_kept(two_steps, tmp_path, capsys):
    """checkpoint-2's trainer state is cut short; resuming with --run.keep-checkpoints 1 falls back to
    checkpoint-1 (saying so), sets checkpoint-2 aside instead of deleting it, and ends with a new checkpoint-2."""
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    state = run / "checkpoint-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    damaged = state.read_bytes()
    train(_parse(["--resume", str(run), "--run.keep-checkpoints", "1"]))
    out = capsys.readouterr().out
    assert "skipping checkpoint-2" in out and "set aside as checkpoint-2.damaged" in out, out
    assert (run / "checkpoint-2.damaged" / "trainer_state.pt").read_bytes() == damaged, "kept as it was"
    assert [s for s, _ in list_checkpoints(run)] == [2], "the new checkpoint-2; checkpoint-1 pruned only after it"
    assert torch.load(run / "checkpoint-2" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_from_a_named_checkpoint(two_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    cfg = _parse(["--resume", str(run / "checkpoint-1")])
    assert cfg.run.out == str(run)
    (run / "checkpoint-1" / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(RunFolderError, match=rf"does not load.*--resume {run / 'checkpoint-2'}"):
        train(cfg)  # a checkpoint named that does not load: no fallback, the others are named
    shutil.rmtree(run)
    shutil.copytree(two_steps, run)
    train(_parse(["--resume", str(run / "checkpoint-1")]))
    assert (run / "checkpoint-2.abandoned").is_dir(), "the later checkpoint is set aside, not deleted"
    assert [s for s, _ in list_checkpoints(run)] == [1, 2]
    assert (run / "latest").read_text() == "checkpoint-2\n"


def test_a_crash_in_sft_then_the_named_command_works(tmp_path, capsys):
    """Killed during Cold-Start SFT (no checkpoint yet): a rerun refuses, --resume refuses, and both name the
    command that starts it again, which then runs."""
    run = tmp_path / "run"
    save_config(_tiny(tmp_path, run, grpo={"steps": 1}, sft={"steps": 2}), tmp_path / "cfg.toml")
    r = _run(["-m", "emor3.grpo.train", "--config", str(tmp_path / "cfg.toml")], REPO, {"EMOR3_FAULT_AT": "1:SFT step"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    err = _refused(grpo_train.main, ["--config", str(tmp_path / "cfg.toml")], capsys)
    assert "--resume" not in err and "--overwrite" in err, "no checkpoint: --resume would fail"
    err = _refused(grpo_train.main, ["--resume", str(run)], capsys)
    command = f"python -m emor3.grpo.train --config {run / 'config.toml'} --overwrite"
    assert command in err, err
    grpo_train.main(command.split()[3:])
    assert (run / "results.json").is_file()


def test_a_crash_in_the_final_evaluation_resumes(tmp_path):
    run = tmp_path / "run"
    save_config(_tiny(tmp_path, run, grpo={"steps": 1}), tmp_path / "cfg.toml")
    from emor3.toy.emoscenes import eval_split_names

    # the baseline evaluates the table's sets before training; the next set evaluated is the final evaluation's first
    first_final = len(eval_split_names()) + 1
    r = _run(["-m", "emor3.grpo.train", "--config", str(tmp_path / "cfg.toml")], REPO,
             {"EMOR3_FAULT_AT": f"{first_final}:evaluated set"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert latest_checkpoint(run) is not None and not (run / "results.json").exists()
    train(_parse(["--resume", str(run)]))
    assert set(json.loads((run / "results.json").read_text())) == {"initial", "emo_r3"}


# ------------------------------------------------------------------------------------------------ 4. inputs


def test_traces_refuses_to_write_into_its_data(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    manifest = data / "train.jsonl"
    manifest.write_text('{"image": "a.png", "label": "joy"}\n')
    for out in (manifest, data / "traces.jsonl"):
        err = _refused(sft.main, ["traces", "--teacher", "none", "--data", str(manifest if out == manifest else data),
                                  "--out", str(out)], capsys)
        assert "--data" in err and str(out) in err
    assert manifest.read_text() == '{"image": "a.png", "label": "joy"}\n' and sorted(os.listdir(data)) == ["train.jsonl"]


def _tiny_model(seed: int):
    from emor3.models.sizes import tiny_config
    from emor3.models import QwenVL

    return QwenVL(tiny_config("tiny")).init_weights(seed)


def test_merge_refuses_a_foreign_base_and_a_non_empty_out(tmp_path, capsys):
    from emor3.models.__main__ import main as models_main
    from emor3.models.lora import add_lora, save_adapter

    base, other = tmp_path / "base", tmp_path / "other"
    save_pretrained(_tiny_model(1), base)
    save_pretrained(_tiny_model(2), other)  # the same architecture and shapes, other weights
    model = load_pretrained(base)
    add_lora(model, rank=2, alpha=4)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base),
                 base_fingerprint={"path": str(base), "sha256": content_hash(base)})
    err = _refused(models_main, ["merge", str(tmp_path / "adapter"), "--base", str(other), "--out",
                                 str(tmp_path / "m")], capsys)
    assert "is not the base" in err and str(base) in err
    assert not (tmp_path / "m").exists()
    before = _snapshot(other)
    err = _refused(models_main, ["merge", str(tmp_path / "adapter"), "--out", str(other)], capsys)
    assert "not empty" in err and "--overwrite" in err
    assert _snapshot(other) == before, "an existing model folder is left as it is"
    models_main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")])
    assert (tmp_path / "m" / "model.safetensors").is_file()
    models_main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"), "--overwrite"])
    # without a fingerprint (an adapter made elsewhere): a warning, the architecture still checked
    (tmp_path / "adapter" / "base_fingerprint.json").unlink()
    models_main(["merge", str(tmp_path / "adapter"), "--base", str(other), "--out", str(tmp_path / "m2")])
    assert "records no fingerprint" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["auto_mapping"]["base_model_class"] = "Qwen3VLForConditionalGeneration"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    err = _refused(models_main, ["merge", str(tmp_path / "adapter"), "--base", str(other), "--out",
                                 str(tmp_path / "m3")], capsys)
    assert "qwen2_5_vl model" in err and "Qwen3VL" in err


def test_merge_waits_for_no_one_and_refuses_a_locked_out(tmp_path, capsys):
    from emor3.models.__main__ import main as models_main
    from emor3.models.lora import add_lora, save_adapter

    save_pretrained(_tiny_model(1), tmp_path / "base")
    model = load_pretrained(tmp_path / "base")
    add_lora(model, rank=2, alpha=4)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    holder = _start(["-c", "import sys, time; from emor3.folders import lock_folder; lock_folder(sys.argv[1], 'x'); "
                     "print('locked', flush=True); time.sleep(120)", str(tmp_path / "out")])
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _refused(models_main, ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")], capsys)
        assert f"process {holder.pid}" in err
    finally:
        holder.kill()
        holder.communicate(timeout=30)


def test_evaluation_sets_are_the_ones_asked_for():
    assert eval_requests([], "", WORLD) == ([], [])
    assert eval_requests(["test", "mine=a.jsonl@in"], "", WORLD) == (["test"], ["mine=a.jsonl@in"])
    for bad, match in ((["test=mine.jsonl"], "EmoScenes' built-in split"), (["a=x.jsonl", "a=y.jsonl"], "named twice"),
                       (["ood_binary"], "not an EmoScenes split")):
        with pytest.raises(UsageError, match=match):
            eval_requests(bad, "", WORLD)
    with pytest.raises(UsageError, match="only when EmoScenes is the training data"):
        eval_requests(["test"], "train.jsonl", WORLD)
    with pytest.raises(SystemExit):
        _parse(["--data.eval", "a=x.jsonl,a=y.jsonl"])  # caught when the flags are read


def test_a_shadowing_eval_name_is_refused_before_overwrite_touches_anything(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    (tmp_path / "mine.jsonl").write_text("")
    err = _refused(evaluate.main, ["--out", str(run), "--overwrite", "--eval-data", f"test={tmp_path / 'mine.jsonl'}"],
                   capsys)
    assert "EmoScenes' built-in split" in err and (run / "results.json").read_text() == "{}"


def test_only_the_asked_sets_are_evaluated(tmp_path):
    from emor3.toy.emoscenes import write_emoscenes

    paths = write_emoscenes(tmp_path / "es", seed=0, n_train=4, n_test=4, n_ood=2)
    d = {"cache_dir": str(tmp_path / "cache"), "emoscenes_train": 4, "emoscenes_test": 4, "emoscenes_ood": 2}
    mine = _tiny(tmp_path, tmp_path / "r", data={**d, "eval": [f"mine={paths['test']}@in"]})
    assert [e.name for e in build_data(mine, WORLD)[2]] == ["mine"], "EmoScenes only when asked"
    both = _tiny(tmp_path, tmp_path / "r", data={**d, "eval": [f"mine={paths['test']}@in", "ood_render"]})
    assert [e.name for e in build_data(both, WORLD)[2]] == ["ood_render", "mine"]
    default = _tiny(tmp_path, tmp_path / "r", data=d)
    from emor3.toy.emoscenes import eval_split_names

    assert [e.name for e in build_data(default, WORLD)[2]] == eval_split_names(), \
        "no set given: EmoScenes' table splits"


def test_a_colon_in_an_eval_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a:b.jsonl").write_text("")
    assert parse_eval_spec("x=a:b.jsonl") == ("x", "a:b.jsonl", None, "out"), "an existing path is taken whole"
    assert parse_eval_spec("x=a:b.jsonl:binary@in") == ("x", "a:b.jsonl", "binary", "in")
    assert parse_eval_spec("x=set.jsonl:my_tax.toml") == ("x", "set.jsonl", "my_tax.toml", "out")
    from emor3.config import DataConfig
    from dataclasses import fields

    help_text = {f.name: f.metadata["help"] for f in fields(DataConfig)}["eval"]
    assert "':'" in help_text, "the flag's help says how a path with ':' is read"


def test_the_instruct_copy_follows_the_umask(tmp_path):
    from emor3.toy.instruct import copy_checkpoint

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "config.json").write_text("{}")
    os.chmod(tmp_path / "cache" / "config.json", 0o644)
    old = os.umask(0o077)
    try:
        copy_checkpoint(tmp_path / "cache", tmp_path / "run" / "instruct")
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "instruct" / "config.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "run" / "instruct").stat().st_mode & 0o777 == 0o700


# ------------------------------------------------------------------------------------------------ 5. numbers, OS


def test_non_finite_weights_are_named_on_load(tmp_path):
    model = _tiny_model(0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 3] = float("nan")
    save_pretrained(model, tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*1 non-finite"):
        load_pretrained(tmp_path / "m")


def test_the_dry_run_says_whether_it_fits(capsys):
    small = train(_parse(["--dry-run", "--model.device", "cpu"]))
    assert small["fits"] is True and "fits: yes" in capsys.readouterr().out
    huge = train(_parse(["--dry-run", "--model.device", "cpu", "--model.tiny", "tiny", "--grpo.prompts-per-step",
                         "4096", "--grpo.mini-batch-prompts", "4096", "--grpo.group-size", "64",
                         "--grpo.micro-batch-rows", "262144", "--grpo.max-new-tokens", "4096"]))
    out = capsys.readouterr().out
    assert huge["fits"] is False and "fits: NO" in out and "exceeds" in out, out


def test_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    err = _refused(grpo_train.main, ["--out", str(tmp_path / "afile")], capsys, code=1)
    assert str(tmp_path / "afile") in err and "not a folder" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(NotADirectoryError):
        grpo_train.main(["--out", str(tmp_path / "afile"), "--debug"])
    import emor3.run_folder as run_folder

    for code, words in ((errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")):
        def refuse(folder, command, code=code):  # the first write of a run: its folder's lock file
            raise OSError(code, os.strerror(code), str(Path(folder) / ".lock"))
        monkeypatch.setattr(run_folder, "lock_folder", refuse)
        err = _refused(grpo_train.main, ["--out", str(tmp_path / f"r{code}")] + _tiny_flags(tmp_path), capsys, code=1)
        assert str(tmp_path / f"r{code}" / ".lock") in err and words in err, err
        assert len(err.strip().splitlines()) == 1, err


def _tiny_flags(tmp_path):
    return ["--sft.steps", "0", "--data.cache-dir", str(tmp_path / "es"), "--run.progress", "false"]
