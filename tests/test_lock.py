"""The venv the suite runs in holds exactly the versions of requirements.lock (issue 23).

`make setup` installs with the lock as pip constraints, so a fresh clone gets the set the suite last passed with. This
test compares every installed distribution with the lock, both ways: a package at another version, a package the lock
does not name, and a locked package that is missing all fail. Left out: the project itself (installed editable),
pip, setuptools and wheel (the venv's own tooling), and torch's local label (`2.13.0+cpu` is the lock's `2.13.0`).
`make test-latest` runs the suite on a fresh resolution without the lock on purpose; it sets PREMOE_UNLOCKED.
"""

from __future__ import annotations

import os
import re
import site
from importlib import metadata
from pathlib import Path

import pytest

from scripts.lock_inputs import lock_inputs

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
TOOLING = {"pip", "setuptools", "wheel", "premoe-service"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, str]:
    """Package -> version from the lock's `name==version` lines (comments and blank lines skipped)."""
    pins: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", line)
        if not match:
            raise ValueError(f"{LOCK.name}:{number}: expected 'name==version', got {line!r}")
        pins[normalise(match[1])] = match[2]
    return pins


def installed() -> dict[str, str]:
    """What the venv's site-packages hold. Not all of `sys.path`: importing setuptools (torch's compiler does)
    appends setuptools' own vendored packages to it, which are no installed distributions."""
    found = {}
    for dist in metadata.distributions(path=site.getsitepackages()):
        name = normalise(dist.metadata["Name"])
        if name not in TOOLING:
            found[name] = dist.version.split("+", 1)[0]
    return found


def differences(pins: dict[str, str], present: dict[str, str]) -> list[str]:
    out = [f"{n}: installed {present[n]}, locked {v}" for n, v in pins.items() if n in present and present[n] != v]
    out += [f"{n}: locked {v}, not installed" for n, v in pins.items() if n not in present]
    out += [f"{n}: installed {v}, not in the lock" for n, v in present.items() if n not in pins]
    return sorted(out)


@pytest.mark.skipif(bool(os.environ.get("PREMOE_UNLOCKED")), reason="make test-latest runs without the lock on purpose")
def test_venv_equals_the_lock() -> None:
    problems = differences(read_lock(LOCK.read_text()), installed())
    assert problems == [], "the venv differs from requirements.lock (run `make clean test`):\n" + "\n".join(problems)


def test_the_lock_was_made_from_pyprojects_current_dependencies() -> None:
    # `make lock` writes the fingerprint of pyproject.toml's dependency tables into the header; a range or extra
    # changed since means the lock no longer is what those ranges were tested with.
    header = re.search(r"^# inputs: (\w+)", LOCK.read_text(), re.MULTILINE)
    assert header, "requirements.lock has no '# inputs:' line: run `make lock`"
    assert header[1] == lock_inputs(LOCK.parent / "pyproject.toml"), (
        "pyproject.toml's dependencies changed since requirements.lock was made: run `make lock`, then `make test`"
    )


def test_lock_comparison_sees_each_kind_of_difference() -> None:
    pins = read_lock("# header\ntransformers==5.24.0\ntorch==2.13.0\nnumpy==2.0.0  # trailing\n")
    assert pins == {"transformers": "5.24.0", "torch": "2.13.0", "numpy": "2.0.0"}
    assert differences(pins, {"transformers": "5.24.0", "torch": "2.13.0", "numpy": "2.0.0"}) == []
    assert differences(pins, {"transformers": "5.25.0", "torch": "2.13.0", "numpy": "2.0.0", "extra": "1"}) == [
        "extra: installed 1, not in the lock",
        "transformers: installed 5.25.0, locked 5.24.0",
    ]
    assert differences(pins, {"transformers": "5.24.0", "torch": "2.13.0"}) == ["numpy: locked 2.0.0, not installed"]
    with pytest.raises(ValueError, match=r"requirements\.lock:1"):
        read_lock("transformers>=5\n")
