"""examples/walkthrough.sh and README's "A real-data walkthrough" cannot rot unnoticed: the script is valid bash, and
every command in it and in the README section parses with the CLI it calls (flags, types, choices, config files),
without running any of them. The script runs with a stand-in interpreter that records each command's arguments
after bash has expanded them; each is then parsed in-process by its own parser."""

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "walkthrough.sh"
SEP = "--end-of-command--"


class _Parsed(Exception):
    pass


def dry_parse(args: list[str], monkeypatch) -> str:
    """Parse one `python ARGS` command line with its CLI's parser, running nothing; return what was parsed."""
    import emor3.config

    if args[0] == "-m":
        module, rest = args[1], args[2:]
    else:
        module, rest = args[0], args[1:]
    if module in ("emor3.grpo.train", "emor3.sft", "emor3.evaluate") and rest[:1] not in (["traces"], ["table"]):
        # the config CLIs: values and the TOML checked too; the inputs are made by the script's earlier steps
        emor3.config.parse_args(rest, f"python -m {module}", "", check_paths=False)
        return module
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        raise _Parsed(original(self, *a, **kw))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        if module == "examples/walkthrough_data.py":
            sys.path.insert(0, str(ROOT / "examples"))
            try:
                import walkthrough_data
            finally:
                sys.path.remove(str(ROOT / "examples"))
            walkthrough_data.main(rest)
        elif module == "emor3.sft":
            import emor3.sft
            emor3.sft.main(rest)
        elif module == "emor3.evaluate":
            import emor3.evaluate
            emor3.evaluate.main(rest)
        elif module == "emor3.data":
            from emor3.data.__main__ import main
            main(rest)
        elif module == "emor3.models":
            from emor3.models.__main__ import main
            main(rest)
        else:
            raise AssertionError(f"the walkthrough calls {module!r}, which this test does not know how to parse")
    except _Parsed:
        return module + (" " + rest[0] if rest and not rest[0].startswith("-") else "")
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    raise AssertionError(f"{args}: the CLI returned without parsing its arguments")


def recorded_commands(tmp_path) -> list[list[str]]:
    """Every interpreter call of the script, its arguments as bash expanded them."""
    log = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\nfor a in "$@"; do printf "%s\\n" "$a"; done >> "{log}"\n'
                    f'echo {SEP} >> "{log}"\n')
    stub.chmod(0o755)
    subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], check=True, timeout=60,
                   env={**os.environ, "PYTHON": str(stub)})
    calls, cur = [], []
    for line in log.read_text().splitlines():
        if line == SEP:
            calls.append(cur)
            cur = []
        else:
            cur.append(line)
    return calls


def readme_commands() -> list[list[str]]:
    """`python ...` commands of the README section's code blocks (backslash continuations joined)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## A real-data walkthrough\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README has no '## A real-data walkthrough' section"
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", m.group(1), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python "):
                cmds.append(shlex.split(line)[1:])
    return cmds


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_script_command_parses(tmp_path, monkeypatch):
    calls = recorded_commands(tmp_path)
    parsed = [dry_parse(c, monkeypatch) for c in calls]
    for step in ("emor3.data emoset-subset", "emor3.sft", "emor3.sft traces", "emor3.grpo.train",
                 "emor3.models merge", "emor3.evaluate", "emor3.evaluate table"):
        assert step in parsed, f"the walkthrough no longer runs {step}: {parsed}"
    train = [c for c in calls if c[:2] == ["-m", "emor3.grpo.train"]]
    assert len(train) == 2 and all("--model.lora-rank" in c for c in train), "two LoRA settings"


def test_every_readme_command_parses_and_is_in_the_script(monkeypatch):
    cmds = readme_commands()
    assert len(cmds) >= 8, cmds
    script = SCRIPT.read_text()
    for c in cmds:
        dry_parse(c, monkeypatch)
        module = c[1] if c[0] == "-m" else c[0]
        assert module in script, f"README runs {module}, which the script does not"


def test_a_bad_flag_or_value_fails(monkeypatch):
    """The dry parse is not a rubber stamp: an unknown flag or a bad value fails."""
    with pytest.raises(SystemExit):
        dry_parse(["-m", "emor3.grpo.train", "--model.lora-rnak", "8"], monkeypatch)
    with pytest.raises(SystemExit):
        dry_parse(["-m", "emor3.grpo.train", "--model.lora-rank", "eight"], monkeypatch)
    with pytest.raises(SystemExit):
        dry_parse(["-m", "emor3.sft", "traces", "--teacher", "t", "--data", "d", "--out", "o", "--n", "x"],
                  monkeypatch)


def test_eval_spec_taxonomy_suffix():
    """--data.eval NAME=PATH[:TAXONOMY][@in|@out]: the taxonomy suffix reaches the loader (the walkthrough's WebEmo
    set is evaluated at the binary level); a path's own separators are not mistaken for it."""
    from emor3.config import parse_eval_spec

    assert parse_eval_spec("webemo=/d/WebEmo/test25.txt:binary@out") == \
        ("webemo", "/d/WebEmo/test25.txt", "binary", "out")
    assert parse_eval_spec("e6=/d/Emotion6@in") == ("e6", "/d/Emotion6", None, "in")
    assert parse_eval_spec("x=rel/a:b/c.jsonl") == ("x", "rel/a:b/c.jsonl", None, "out")
    assert parse_eval_spec("x=set.jsonl:my_tax.toml") == ("x", "set.jsonl", "my_tax.toml", "out")
