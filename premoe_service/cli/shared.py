"""Options that several verbs share (store, device, embedder, progress, a server to talk to), declared once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .params import CRITERION, POLICY, UNIT, F, option, selection_default

DEFAULT_SERVER = "127.0.0.1:50051"


def store_option(required: bool = True, **kwargs: Any) -> Callable[[F], F]:
    """`--store` (PREMOE_STORE): a folder written by `premoe shard`."""
    return option(
        "--store",
        required=required,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help=kwargs.pop("help", "store folder (written by `premoe shard`)"),
        **kwargs,
    )


def embedder_option(purpose: str = "") -> Callable[[F], F]:
    return option(
        "--embedder",
        help=" ".join(f"local sentence-transformers model {purpose} (default: all-MiniLM-L6-v2)".split()),
    )


def selection_options(whose: str) -> Callable[[F], F]:
    """--criterion, --policy, --value, --unit: the `Selection` of `whose`, its choices and defaults read from the
    profiler (`premoe serve` and `premoe profile` share them)."""
    declared = (
        option("--criterion", type=CRITERION, default=selection_default("criterion"), help=f"criterion of {whose}"),
        option("--policy", type=POLICY, default=selection_default("policy"), help=f"selection policy of {whose}"),
        option(
            "--value",
            type=float,
            default=selection_default("value"),
            help="policy value: per-layer count or fraction, coverage share, or budget",
        ),
        option("--unit", type=UNIT, default=selection_default("unit"), help="unit of --value"),
    )

    def decorate(f: F) -> F:
        for declare in reversed(declared):  # the order of --help
            f = declare(f)
        return f

    return decorate


device_option = option("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
quiet_option = option("--quiet", is_flag=True, help="no progress bar")


PEM_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
TLS_KEY = "premoe.tls"  # where the TLS options of a client verb wait in click's context for `connect`


def _keep_tls(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and value is not False:
        ctx.meta.setdefault(TLS_KEY, {})[param.name] = value
    return value


def _tls_options(f: F) -> F:
    """--tls, --tls-ca, --tls-client-cert, --tls-client-key: kept in the context for `connect`, not passed to the
    verb (every client verb takes them)."""
    hidden: dict[str, Any] = {"expose_value": False, "callback": _keep_tls}
    declared = (
        option("--tls", is_flag=True, help="connect over TLS with the system's CAs (--tls-ca implies it)", **hidden),
        option("--tls-ca", type=PEM_FILE, help="PEM CA bundle that signed the server's certificate (TLS)", **hidden),
        option("--tls-client-cert", type=PEM_FILE, help="PEM certificate of this client, for mutual TLS", **hidden),
        option("--tls-client-key", type=PEM_FILE, help="PEM private key of --tls-client-cert", **hidden),
    )
    for declare in reversed(declared):
        f = declare(f)
    return f


def client_options(*, admin: bool = False, timeout: float = 300.0) -> Callable[[F], F]:
    """The server address, the call deadline, the credentials and TLS of a client verb."""

    def decorate(f: F) -> F:
        f = _tls_options(f)
        f = option("--server", default=DEFAULT_SERVER, help="server address host:port")(f)
        f = option("--timeout", type=click.FloatRange(0, min_open=True), default=timeout, help="deadline in seconds")(f)
        f = option("--api-key", help="the server's inference API key (sent as authorization: Bearer)")(f)
        if admin:
            f = option("--admin-token", help="the server's admin token (sent as authorization: Bearer)")(f)
        return f

    return decorate


def connect(server: str, timeout: float, api_key: str | None = None, admin_token: str | None = None) -> Any:
    """A client of the server; only grpc and the generated code are imported, never torch."""
    from ..client import PreMoeClient

    ctx = click.get_current_context(silent=True)
    tls: dict[str, Any] = ctx.meta.get(TLS_KEY, {}) if ctx is not None else {}
    if ("tls_client_cert" in tls) != ("tls_client_key" in tls):
        raise click.BadParameter("mutual TLS needs both --tls-client-cert and --tls-client-key", param_hint="--tls")
    pem = {name: Path(tls[flag]).read_bytes() for flag, name in _TLS_FILES.items() if flag in tls}
    return PreMoeClient(
        server, api_key=api_key, admin_token=admin_token, timeout=timeout, tls=bool(tls.get("tls")), **pem
    )


_TLS_FILES = {"tls_ca": "tls_ca", "tls_client_cert": "tls_cert", "tls_client_key": "tls_key"}


def store_spec(store: Any) -> Any:
    """The MoE shape and routing of a store's model (from its config.json)."""
    from transformers import AutoConfig

    from ..families import adapter_for

    config = AutoConfig.from_pretrained(store.dir, local_files_only=True)
    return adapter_for(config).spec(config)
