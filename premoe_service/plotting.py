"""matplotlib for the commands that draw (eval, `profile show --png`, benchmarks): an optional extra, loaded lazily."""

from __future__ import annotations

from typing import Any

from .errors import FailedPrecondition


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a clear error naming the extra that installs it.

    The server and the clients never draw, so matplotlib is not a core dependency: `pip install
    'premoe-service[plots]'` adds it (the Makefile's venv has it).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise FailedPrecondition(
            "drawing a plot needs matplotlib: pip install 'premoe-service[plots]'", field="plots"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
