"""Ray is optional: without it `premoe serve` and the CLI work and `premoe serve-ray` says what to install; the Serve
config it prints carries the service's settings back unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from premoe_service.errors import InvalidArgument
from premoe_service.profiler.selection import Selection
from premoe_service.ray_serve.settings import RaySettings, config_from_args, config_to_args, settings_from_args
from premoe_service.serving import ServiceConfig

NO_RAY = """
import sys
sys.modules["ray"] = None  # any `import ray` fails, as on a machine without the extra
from premoe_service.cli import main
import premoe_service.server  # the single server's modules import no Ray
assert main(["serve", "--help"]) == 0
code = main(["serve-ray", "--store", sys.argv[1], "--redis-url", "redis://127.0.0.1:1/0", "--admin-token", "t"])
print("exit", code)
"""


def test_the_cli_and_the_single_server_need_no_ray(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", NO_RAY, str(tmp_path / "store")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "exit 2" in done.stdout
    assert "pip install -e '.[ray]'" in done.stderr


def test_service_settings_survive_the_serve_config(tmp_path: Path) -> None:
    config = ServiceConfig(
        store=tmp_path,
        profiles=tmp_path / "profiles",
        redis_url="redis://127.0.0.1:6379/0",
        budget="40%",
        admin_token="t",
        selection=Selection("frequency", "top_k", 4, "experts"),
        preload=("code",),
    )
    args = config_to_args(config)
    back = config_from_args(args)
    for name in ("store", "profiles", "redis_url", "budget", "admin_token", "selection", "preload"):
        assert getattr(back, name) == getattr(config, name), name
    settings = RaySettings(replicas=2, replica_cpus=0.5, tasks_per_replica=3, affinity=False)
    assert settings_from_args(settings.__dict__) == settings


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"port": 50051}, "port"),
        ({"tls_cert": "cert.pem"}, "tls_cert"),
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"redis_url": None}, "redis_url"),
        ({"budget": "7"}, "budget"),
    ],
)
def test_a_bad_service_setting_is_refused_naming_it(tmp_path: Path, change: dict, field: str) -> None:
    args = {"store": str(tmp_path), "redis_url": "redis://127.0.0.1:6379/0", **change}
    with pytest.raises(InvalidArgument) as refused:
        config_from_args(args)
    assert refused.value.field == field or field in str(refused.value)


def test_a_bad_deployment_setting_is_refused_naming_it() -> None:
    with pytest.raises(InvalidArgument) as refused:
        settings_from_args({"replicas": -1})
    assert refused.value.field == "replicas"
    with pytest.raises(InvalidArgument) as refused:
        settings_from_args({"replica_count": 2})
    assert refused.value.field == "replica_count"


def test_tasks_that_fit_counts_shared_experts_once() -> None:
    from itertools import permutations
    from random import Random

    from premoe_service.ray_serve.holding import tasks_per_replica, tasks_that_fit

    slots = {0: 4, 1: 4}
    same = [{0: frozenset({0, 1, 2}), 1: frozenset({5, 6})}] * 5
    assert tasks_that_fit(same, slots) == 5  # one pattern five times: all fit
    disjoint = [{0: frozenset({2 * i, 2 * i + 1}), 1: frozenset({i})} for i in range(5)]
    assert tasks_that_fit(disjoint, slots) == 2  # two halves of layer 0, whatever the order

    rng = Random(3)
    mixed = [{layer: frozenset(rng.sample(range(8), 2)) for layer in slots} for _ in range(5)]

    def fit(order: tuple[int, ...]) -> int:  # the exact count for one order, written out again
        held: dict[int, set[int]] = {0: set(), 1: set()}
        for count, i in enumerate(order):
            if any(len(held[layer] | mixed[i][layer]) > slots[layer] for layer in slots):
                return count
            for layer in slots:
                held[layer] |= mixed[i][layer]
        return len(order)

    orders = list(permutations(range(5)))
    exact = sum(fit(order) for order in orders) / len(orders)
    assert tasks_that_fit(mixed, slots, orders=4000) == pytest.approx(exact, abs=0.06)
    assert tasks_per_replica(mixed, slots, experts=8) == int(tasks_that_fit(mixed, slots))
    assert tasks_per_replica(mixed, {0: 8, 1: 8}, experts=8) == -1  # every expert has a slot: no limit
