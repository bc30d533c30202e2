"""matplotlib is an extra ('plots'): the server, the clients and the CLI work without it, and a command that draws
says which extra to install (issue 28)."""

from __future__ import annotations

import subprocess
import sys

NO_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # any `import matplotlib` fails, as on an install without the extra
import premoe_service.server.app, premoe_service.serving, premoe_service.client  # the server and the clients
from premoe_service.cli import main
assert main(["serve", "--help"]) == 0
from premoe_service.errors import FailedPrecondition
from premoe_service.plotting import pyplot
try:
    pyplot()
except FailedPrecondition as exc:
    print("refused:", exc)
"""

LOADED = """
import sys
import premoe_service.server.app, premoe_service.serving, premoe_service.client, premoe_service.cli
print("matplotlib loaded" if "matplotlib" in sys.modules else "no matplotlib")
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_server_and_clients_work_without_matplotlib_and_a_plot_names_the_extra() -> None:
    done = run(NO_MATPLOTLIB)
    assert done.returncode == 0, done.stderr
    assert "refused: plots: drawing a plot needs matplotlib: pip install 'premoe-service[plots]'" in done.stdout


def test_the_server_and_clients_do_not_load_matplotlib() -> None:
    done = run(LOADED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no matplotlib"
