"""`premoe serve-ray`: the engine on Ray Serve, several replicas behind Serve's gRPC proxy, routed by task. The engine
options are `premoe serve`'s own declarations (same flags, same PREMOE_* twins); the doors' options are not, since
Serve's proxies own the ports. Ray is imported only when the verb runs, so `premoe serve` needs no Ray."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from ..errors import InvalidArgument
from .bench import bench_option
from .params import PORT, POSITIVE, Verb, option, verb
from .serve import serve, service_config

# `premoe serve` flags of the doors it runs itself; on Ray, Serve's proxies are the doors (no TLS, no metrics port).
DOOR_PARAMS = frozenset(
    {"host", "port", "http_port", "metrics_port", "tls_cert", "tls_key", "tls_client_ca", "grace_s"}
)
RAY_PARAMS = (
    "ray_address",
    "ray_num_cpus",
    "replicas",
    "replica_cpus",
    "replica_gpus",
    "ingress_cpus",
    "tasks_per_replica",
    "affinity",
    "grpc_port",
    "serve_http_port",
    "print_config",
)
CPUS = click.FloatRange(0)


@verb("serve-ray", short_help="serve the gRPC API from several engine replicas on Ray Serve, routed by task")
@option(
    "--ray-address",
    help="Ray cluster to deploy to ('auto' on a node of a cluster started with `ray start`; default: a local instance)",
)
@option("--ray-num-cpus", type=click.IntRange(min=1), help="CPUs of the local Ray instance (default: all)")
@option(
    "--replicas",
    type=click.IntRange(min=0),
    default=0,
    help="engine replicas, one per device (0: one per GPU of the cluster, or 1 without GPUs)",
)
@option("--replica-cpus", type=CPUS, default=1.0, help="CPUs Ray reserves per engine replica (fractions allowed)")
@option("--replica-gpus", type=CPUS, help="GPUs Ray reserves per engine replica (default: 1 when the cluster has GPUs)")
@option("--ingress-cpus", type=CPUS, default=0.5, help="CPUs Ray reserves for the ingress (checks and forwarding)")
@option(
    "--tasks-per-replica",
    type=click.IntRange(min=-1),
    default=0,
    help="tasks one replica's budget holds (Serve's multiplexing LRU; 0: the registered tasks that fit, -1: no limit)",
)
@option(
    "--affinity/--no-affinity",
    default=True,
    help="send each request to a replica holding its task (Serve's model multiplexing); off: Serve's default routing",
)
@option("--grpc-port", type=PORT, default=9000, help="port of Serve's gRPC proxy (it binds every interface)")
@option(
    "--serve-http-port",
    type=PORT,
    default=8000,
    help="port of Serve's HTTP proxy: the OpenAI-compatible API at /v1, routed by task like gRPC",
)
@option(
    "--print-config",
    is_flag=True,
    help="print the Serve config YAML for `serve deploy` on a cluster instead of running",
)
def serve_ray(**params: Any) -> int:
    """Deploy premoe.v1.PreMoe on Ray Serve: an ingress that retrieves each prompt's task and engine replicas
    (one per device, each the `premoe serve` engine) that Serve picks by task, so a task's requests go to a replica
    that already holds its experts. The replicas share Redis (--redis-url, required: expert cache and task
    registry) and the profile folder (--profiles: the registry's record, with deletions). Without --ray-address a
    local Ray instance is started and stopped with the verb."""
    ray_options = {name: params.pop(name) for name in RAY_PARAMS}
    for name in ("store", "profiles"):
        if params.get(name) is not None:
            params[name] = Path(params[name]).resolve()  # the replicas may run elsewhere: no relative paths
    config = service_config(params)
    if not config.redis_url:
        raise InvalidArgument("replicas share the expert cache and the task registry through Redis", field="redis_url")
    if not config.admin_token and not config.allow_insecure_admin:
        raise InvalidArgument(
            "Serve's gRPC proxy binds every interface: set an admin token, or --allow-insecure-admin",
            field="admin_token",
        )
    from ..ray_serve.settings import RaySettings, serve_config_yaml

    settings = RaySettings(
        replicas=ray_options["replicas"],
        replica_cpus=ray_options["replica_cpus"],
        replica_gpus=ray_options["replica_gpus"],
        ingress_cpus=ray_options["ingress_cpus"],
        tasks_per_replica=ray_options["tasks_per_replica"],
        affinity=ray_options["affinity"],
    )
    if ray_options["print_config"]:
        click.echo(serve_config_yaml(config, settings, ray_options["grpc_port"], ray_options["serve_http_port"]))
        return 0
    try:
        from ..ray_serve.app import run
    except ImportError as exc:
        raise click.UsageError(f"Ray is not installed ({exc}): pip install -e '.[ray]'") from None
    return run(
        config,
        settings,
        address=ray_options["ray_address"],
        grpc_port=ray_options["grpc_port"],
        http_port=ray_options["serve_http_port"],
        num_cpus=ray_options["ray_num_cpus"],
    )


# The engine's options are `premoe serve`'s declarations: one flag, one twin, one default for both verbs.
serve_ray.params[:0] = [p for p in serve.params if p.name not in DOOR_PARAMS]


@click.command("ray", cls=Verb, short_help="two replicas on Ray Serve: routing by task vs Serve's default routing")
@option("--store", type=click.Path(file_okay=False), help="store (default: var/reference-store, sharded when missing)")
@option("--profiles", default="profiles", type=click.Path(file_okay=False), help="the eight task profiles")
@bench_option("--requests", type=POSITIVE, default=400, help="measured requests, after the warm-up")
@bench_option("--warmup", type=click.IntRange(min=0), default=32, help="warm-up requests of the same stream")
@bench_option("--clients", type=POSITIVE, default=4, help="concurrent clients")
@bench_option("--tasks-held", type=POSITIVE, default=4, help="tasks whose patterns one replica's budget holds")
@bench_option("--seed", type=int, default=0, help="seed of the request stream")
@bench_option("--out", default="var/bench-ray.json", help="JSON report")
def bench_ray(
    store: str | None, profiles: str, requests: int, warmup: int, clients: int, tasks_held: int, seed: int, out: str
) -> int:
    """Deploy two engine replicas on a local Ray instance with a budget each that holds about half of the eight
    tasks, and send one stream with task locality twice from a cold start: with the task as Serve's multiplexed
    model id, and with Serve's default routing. Prints bytes of experts moved, hit rate, tokens/s, latency, and how
    much of the saving comes from routing and how much from experts shared between patterns."""
    from ..bench.ray.affinity import RayBenchOptions, main

    options = RayBenchOptions(store, profiles=profiles, requests=requests, warmup=warmup, clients=clients)
    return main(dataclasses.replace(options, tasks_held=tasks_held, seed=seed, out=out))
