"""`premoe bench serve`, server side: `premoe serve` as shipped, started in a process of its own with default flags."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ...loopback import ServerProcess, premoe_server


@contextmanager
def server_process(
    store: Path,
    profiles: Path,
    *,
    device: str,
    budget: str,
    embedder: str | None,
    token_limit: int,
    extra: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Run `premoe serve` on a free loopback port until the block ends. Only what the benchmark needs is set (the
    store, profiles, port, device, budget, a token limit that admits its requests); every other flag keeps its
    default, `extra` adds the caller's own."""
    args = ["--device", device, "--budget", budget]
    if token_limit > 1024:
        args += ["--max-new-tokens-limit", str(token_limit)]
    if embedder:
        args += ["--embedder", embedder]
    with premoe_server(store, profiles, [*args, *extra]) as server:
        yield server
