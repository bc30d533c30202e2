"""`bench.fallback_retention` runs end to end on the reference model: every prompt forced to the fallback (both
similarity floors raised), one row per task."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from premoe_service.store import shard

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference-moe"
ROOT = REFERENCE.parents[1]


def test_fallback_retention_bench_forces_every_prompt_to_the_fallback(tmp_path: Path) -> None:
    shard(REFERENCE, tmp_path / "store", progress=False)
    args = ["--store", str(tmp_path / "store"), "--profiles", str(ROOT / "profiles"), "--limit", "2"]
    args += ["--background", str(ROOT / "reference" / "offtopic" / "background.jsonl")]
    args += ["--data", str(ROOT / "reference" / "tasks")]
    done = subprocess.run(
        [sys.executable, "-m", "premoe_service.bench.route.fallback", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines()[2:] if line.strip()]
    assert sorted(row.split()[0] for row in rows) == sorted(p.stem for p in (ROOT / "profiles").glob("*.safetensors"))
    assert all(re.search(r"\(\d of 2\)$", row) for row in rows)  # each task's prompts took a fallback
