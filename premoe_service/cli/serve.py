"""`premoe serve`: one flag and one PREMOE_* twin per `ServiceConfig` field, defaults read from the dataclass."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from .params import (
    BUDGET,
    PORT,
    POSITIVE,
    SHARE,
    CommaList,
    Lazy,
    LazyChoice,
    option,
    verb,
)
from .shared import embedder_option, selection_options, store_option

SELECTION = ("criterion", "policy", "value", "unit")
PEM = click.Path(exists=True, dir_okay=False, path_type=Path)  # the flags that make the default `Selection`


def _field_default(name: str) -> Any:
    def load(config: type) -> Any:
        field = next(f for f in dataclasses.fields(config) if f.name == name)
        return field.default

    return load


def default(name: str) -> Lazy:
    """The default of a `ServiceConfig` field, so that the flag and the dataclass never disagree."""
    return Lazy("premoe_service.serving.config", "ServiceConfig", load=_field_default(name))


@verb("serve", short_help="serve the gRPC API (and the OpenAI-compatible HTTP API with --http-port)")
@store_option()
@option(
    "--profiles",
    type=click.Path(file_okay=False, path_type=Path),
    help="folder of task profiles (the registry without Redis; seeds Redis with it)",
)
@option("--redis-url", help="Redis for the expert cache and the shared registry (default: embedded cache)")
@option(
    "--budget",
    type=BUDGET,
    default=default("budget"),
    help="device memory for routed experts: a share of the store's expert bytes in its own dtype (0.5, 50%) or bytes "
    "with a unit (512MiB, 8GiB, 2e9B); `premoe eval` counts 16 bits per parameter, so on an fp32 store its 50% is 25% "
    "here",
)
@option("--device", default=default("device"), help="auto (cuda when available), cpu, cuda or cuda:N")
@embedder_option()
@option(
    "--embedder-precision",
    type=LazyChoice(Lazy("premoe_service.retrieval.embedder", "PRECISIONS")),
    default=default("embedder_precision"),
    help="the embedder's weights: auto (bfloat16 where the CPU or GPU multiplies it natively and the model runs "
    "packed, as the default all-MiniLM-L6-v2 does; else float32), float32 or bfloat16 (docs/serving.md)",
)
@option("--host", default=default("host"), help="address to bind (both doors)")
@option("--port", type=PORT, default=default("port"), help="gRPC port (0: any free port)")
@option("--http-port", type=PORT, help="OpenAI-compatible HTTP API port on --host (0: any free port; default: off)")
@option(
    "--served-model-name",
    help="the HTTP `model` (gRPC `task`) that asks for the whole model, every expert (default: the checkpoint "
    "folder's name; no task may take it)",
)
@option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Jinja chat template file for /v1/chat/completions (default: the tokenizer's, else role: content lines)",
)
@option("--metrics-port", type=PORT, help="Prometheus metrics port (default: off)")
@option(
    "--admin-token",
    help="token required by RegisterTask, DeleteTask, LoadTask, UnloadTask and the HTTP /v1/tasks paths "
    "(authorization: Bearer)",
)
@option(
    "--allow-insecure-admin",
    is_flag=True,
    help="bind a non-loopback --host without --admin-token (anyone reaching the port may register and delete tasks)",
)
@option("--api-key", help="key required (authorization: Bearer) by inference calls over gRPC and HTTP")
@option("--tls-cert", type=PEM, help="PEM certificate (chain): both doors serve TLS (gRPC and HTTPS); needs --tls-key")
@option("--tls-key", type=PEM, help="PEM private key of --tls-cert")
@option("--tls-client-ca", type=PEM, help="PEM CA bundle: clients must present a certificate it signed (mutual TLS)")
@selection_options("new tasks' patterns (the default)")
@option("--route-threshold", type=float, help="retrieval score needed for a task match (default: calibrated)")
@option(
    "--route-signal/--no-route-signal",
    env="ROUTE_SIGNAL",
    default=default("route_signal"),
    help="route on the model's router signal as well as on the demo embeddings",
)
@option(
    "--route-background",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL of off-topic prompts: a none-class for no-match, in place of the one in the profiles' routing record "
    "(routing.json, used by default)",
)
@option(
    "--route-calibration",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="per-task leads over the none-class (written by `premoe route --evaluate --calibrate-out`), in place of the "
    "routing record's",
)
@option(
    "--coverage-floor",
    type=SHARE,
    default=default("coverage_floor"),
    help="widen a pattern whose prefill coverage is below this (0: off, the default: coverage did not predict the "
    "quality lost on the reference model, docs/routing.md)",
)
@option("--max-new-tokens-limit", type=POSITIVE, default=default("max_new_tokens_limit"), help="largest max_new_tokens")
@option("--max-prompt-tokens", type=POSITIVE, default=default("max_prompt_tokens"), help="longest prompt, in tokens")
@option(
    "--max-prompt-bytes",
    type=POSITIVE,
    default=default("max_prompt_bytes"),
    help="longest prompt, in UTF-8 bytes (checked before tokenizing)",
)
@option(
    "--max-description-bytes",
    type=POSITIVE,
    default=default("max_description_bytes"),
    help="longest task description RegisterTask accepts, in UTF-8 bytes",
)
@option("--max-demos", type=POSITIVE, default=default("max_demos"), help="most demos one RegisterTask may carry")
@option("--max-demo-bytes", type=POSITIVE, default=default("max_demo_bytes"), help="longest demo, in UTF-8 bytes")
@option(
    "--max-demos-total-bytes",
    type=POSITIVE,
    default=default("max_demos_total_bytes"),
    help="all demos of one RegisterTask together, in UTF-8 bytes",
)
@option("--max-batch-rows", type=POSITIVE, default=default("max_batch_rows"), help="requests decoding together")
@option(
    "--max-batch-tokens",
    type=POSITIVE,
    default=default("max_batch_tokens"),
    help="prompt tokens in one forward pass beside the decoding rows (longer prompts are fed in chunks)",
)
@option(
    "--max-kv-tokens",
    type=POSITIVE,
    help="tokens the KV cache may hold across running requests: a request joins while its prompt + max_new_tokens fit "
    "beside theirs, and one that never could is refused (default: no cap, the cache grows as it must)",
)
@option(
    "--max-queue",
    type=POSITIVE,
    default=default("max_queue"),
    help="requests waiting for experts or a row before new ones are refused",
)
@option(
    "--join-wait-steps",
    type=click.IntRange(min=0),
    default=default("join_wait_steps"),
    help="decode steps a ready request may wait so that several join in one forward pass (0: none)",
)
@option(
    "--eviction",
    type=LazyChoice(Lazy("premoe_service.serving.config", "EVICTIONS")),
    default=default("eviction"),
    help="which unpinned expert leaves a full layer first: least recently used, or the lowest use count decayed "
    "over recent requests (keeps experts many tasks share)",
)
@option(
    "--precision-slots",
    metavar="PRECISION=N,...",
    help="slots per MoE layer for experts below full precision (e.g. int4=4,int8=2), on top of --budget; tasks "
    "registered with precisions need them, and the store must hold those copies (premoe shard --precisions)",
)
@option(
    "--under-pressure",
    type=LazyChoice(Lazy("premoe_service.serving.config", "UNDER_PRESSURE")),
    default=default("under_pressure"),
    help="when a request's experts do not fit at full precision next to the ones running requests pin: wait for "
    "them, or demote: serve its absent experts from the store's --demote-to copy, in full-precision slots lent out "
    "within the budget (docs/tasks.md)",
)
@option(
    "--demote-to",
    type=LazyChoice(Lazy("premoe_service.store.quant", "BITS")),
    default=default("demote_to"),
    help="the lower precision demotion serves from (the store must hold it: premoe shard --precisions)",
)
@option(
    "--channel-slots",
    metavar="PRECISION@WIDTH=N,...",
    help="channel slots per MoE layer (e.g. full@24=8,int4@48=16): slots holding WIDTH of an expert's intermediate "
    "channels at full precision or packed integers (the store must hold that copy), on top of --budget; tasks "
    "registered with precisions then get channel-level plans (docs/atomic-experts.md)",
)
@option(
    "--channel-criterion",
    type=LazyChoice(Lazy("premoe_service.profiler.channels", "CHANNEL_CRITERIA")),
    default=default("channel_criterion"),
    help="how channel-level plans rank an expert's channels",
)
@option(
    "--channel-variants",
    type=POSITIVE,
    help="distinct (expert, channel set) pairs each channel bank can name per layer over the server's life "
    "(default: four per expert)",
)
@option(
    "--door-process/--no-door-process",
    default=True,
    help="run the gRPC door (and the HTTP API's, with --http-port) in a process of its own, so that client streams "
    "do not share the engine's interpreter",
)
@option(
    "--compile-step/--no-compile-step",
    default=True,
    help="run the decoder stack and the router signal's pass compiled (torch.compile, before serving: about 80 s "
    "the first time on 2 cores for the reference model, 15-30 s at later starts with the generated code cached on "
    "disk; eager when no C++ compiler is found)",
)
@option(
    "--engine-threads",
    type=POSITIVE,
    help="CPU threads of the engine's tensor operations (default: all usable cores but one, leaving one to the doors; "
    "an affinity mask or a container's CPU quota counts, not the host's cores)",
)
@option(
    "--preload",
    type=CommaList(),
    default=(),
    help="tasks whose experts are loaded at start-up; health says SERVING after",
)
@option(
    "--lease-timeout",
    "lease_timeout_s",
    type=click.FloatRange(0, min_open=True),
    default=default("lease_timeout_s"),
    help="seconds a request waits for slots pinned by others",
)
@option(
    "--grace",
    "grace_s",
    type=click.FloatRange(0),
    default=default("grace_s"),
    help="seconds in-flight requests get to finish on shutdown",
)
def serve(**params: Any) -> int:
    """Load the store's dense part, allocate expert slots for the budget, rebuild the task registry from the
    profiles, and serve premoe.v1.PreMoe (with grpc.health.v1 and reflection) until SIGINT/SIGTERM, then drain
    in-flight requests. Every flag has its PREMOE_* twin, so a container is configured by its environment."""
    from ..server import serve as run_server

    cut = run_server(service_config(params))
    if cut:
        click.echo(
            f"premoe serve: shutdown cut off {cut} unfinished request(s); a longer --grace lets them finish", err=True
        )
        return 3
    return 0


def service_config(params: dict[str, Any]) -> Any:
    """The `ServiceConfig` of parsed `serve` options (their names are the dataclass's fields)."""
    from ..profiler import Selection
    from ..serving import ServiceConfig

    fields = dict(params)
    selection = Selection(*(fields.pop(name) for name in SELECTION))
    if not fields["preload"]:
        del fields["preload"]  # the field's own default
    return ServiceConfig(selection=selection, **fields)
