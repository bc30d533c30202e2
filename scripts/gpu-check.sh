#!/usr/bin/env bash
# `make gpu-check`: the CUDA checks on a machine with a GPU, in one script (issue 24.6).
#
# 1. A venv over the machine's own CUDA build of torch (--system-site-packages), every other package at the lock's
#    version: the lock's CPU torch pin is left out, so this venv is exempt from tests/test_lock.py. On a machine
#    without network, WHEELS=DIR names a folder of wheels to install from instead of PyPI.
# 2. tests/test_gpu.py: the patterned model and the engine loop with its loader on cuda, against transformers on
#    cuda (the same tests skip on a machine without a GPU).
# 3. `premoe bench load --device cuda`: each tier into device slots, and the loader's host-to-device bytes/s against
#    one copy of the same bytes from page-locked memory.
# 4. `premoe bench serve --device cuda`: serving throughput against transformers on the same GPU.
# Output goes to var/gpu-check/ (GPU_CHECK_OUT). Sized to finish in under 8 minutes on one GPU, set-up included.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${GPU_CHECK_OUT:-var/gpu-check}
VENV=.venv-gpu
mkdir -p "$OUT"

"$PY" - <<'PYEOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu-check: this python has no torch; run it on a GPU machine whose python3 (or PY=...) has a CUDA torch")
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA device; run it on a GPU machine")
PYEOF
test -x $VENV/bin/python || "$PY" -m venv --system-site-packages $VENV
grep -v -E '^torch==' requirements.lock > $VENV/constraints.txt
pip_args=(-q --disable-pip-version-check -c $VENV/constraints.txt)
if [ -n "${WHEELS:-}" ]; then pip_args+=(--no-index --find-links "$WHEELS"); fi
$VENV/bin/pip install "${pip_args[@]}" -e ".[dev,plots]"
$VENV/bin/python -c "import torch, transformers
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), '| transformers', transformers.__version__)" \
    | tee "$OUT/machine.txt"

status=0
timeout 240 $VENV/bin/python -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt" \
    || status=1
timeout 120 $VENV/bin/premoe bench load --device cuda --rounds 7 2>&1 | tee "$OUT/load.txt" || status=1
timeout 240 $VENV/bin/premoe bench serve --device cuda 2>&1 | tee "$OUT/serve.txt" || status=1
echo "gpu-check: $( [ $status = 0 ] && echo passed || echo FAILED ), output in $OUT"
exit $status
