"""constraints.txt is what the test environment runs: every pinned package is installed at its pinned version.

`make test` installs with `-c constraints.txt`; a pin that drifts from the environment (a hand install, a pin
edited without reinstalling) would make a green run describe other versions than the ones the file names.
`make test-latest` runs the suite unpinned on purpose and sets EMOR3_UNPINNED=1, which skips the check.
"""

import os
import re
from importlib import metadata
from pathlib import Path

import pytest

import hf_reference

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
            assert m, f"constraints.txt: {line!r} is not NAME==VERSION"
            out[m[1]] = m[2]
    return out


def test_constraints_name_the_packages_the_suite_leans_on():
    names = {n.lower() for n in pins()}
    for need in ("transformers", "tokenizers", "peft", "safetensors", "numpy", "pillow", "matplotlib",
                 "hypothesis", "pytest"):
        assert need in names, f"constraints.txt must pin {need}"


@pytest.mark.skipif(os.environ.get("EMOR3_UNPINNED") == "1", reason="make test-latest runs unpinned on purpose")
def test_every_pin_is_the_installed_version():
    wrong = {name: (want, metadata.version(name)) for name, want in pins().items() if metadata.version(name) != want}
    assert not wrong, f"installed versions differ from constraints.txt (name: (pinned, installed)): {wrong}"


@pytest.mark.skipif(os.environ.get("EMOR3_UNPINNED") == "1", reason="make test-latest runs unpinned on purpose")
def test_pinned_transformers_is_inside_the_checked_releases():
    assert hf_reference.checked(), (f"transformers {pins()['transformers']} is pinned but tests/hf_reference.py "
                                    f"says its internals were checked on {hf_reference.CHECKED}")


def test_internals_fail_inside_the_checked_releases_and_skip_outside(monkeypatch):
    def broken():
        with hf_reference.internals("a reference"):
            raise AttributeError("no attribute 'vision_start_token'")

    monkeypatch.setattr(hf_reference.transformers, "__version__", hf_reference.CHECKED[1])
    with pytest.raises(AttributeError):
        broken()
    monkeypatch.setattr(hf_reference.transformers, "__version__", "99.0.0")
    with pytest.raises(pytest.skip.Exception, match="transformers 99.0.0 changed them"):
        broken()
