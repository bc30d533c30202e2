"""Print the fingerprint of what requirements.lock was resolved from: pyproject.toml's dependency tables.

`make lock` writes it into the lock's header; tests/test_lock.py fails when pyproject.toml's dependencies changed
since (the lock would no longer be what a fresh clone of those ranges was tested with)."""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path


def lock_inputs(pyproject: Path) -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    tables = {"dependencies": project.get("dependencies", []), "extras": project.get("optional-dependencies", {})}
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()[:16]


if __name__ == "__main__":
    print(lock_inputs(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")))
