"""The thread defaults count the CPUs this process may use, not the host's (`premoe_service/cores.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from premoe_service.cores import default_engine_threads, usable_cores
print(json.dumps({"host": os.cpu_count(), "usable": usable_cores(), "engine": default_engine_threads()}))
"""


def _child(env: dict[str, str] | None = None, code: str = CHILD) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", code], env=os.environ | (env or {}), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_a_process_pinned_to_one_cpu_counts_one_core_whatever_the_host_has() -> None:
    got = _child()
    assert got["host"] == os.cpu_count()
    assert got["usable"] == 1
    assert got["engine"] == 1


def test_a_cpu_limit_in_the_environment_caps_the_count() -> None:
    unpinned = CHILD.replace("os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})", "")
    assert _child({"LOKY_MAX_CPU_COUNT": "1"}, unpinned)["usable"] == 1
    free = _child({}, unpinned)
    assert free["usable"] == min(len(os.sched_getaffinity(0)), free["host"])
    assert free["engine"] == max(1, free["usable"] - 1)
