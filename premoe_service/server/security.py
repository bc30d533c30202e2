"""Transport and bind policy: TLS for both doors, and no admin door open to the network by accident."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from typing import Any

import grpc

from ..errors import InvalidArgument
from ..serving import ServiceConfig

log = logging.getLogger(__name__)


def check_exposure(config: ServiceConfig) -> None:
    """Refuse a non-loopback bind without an admin token unless `allow_insecure_admin`; warn where admin calls or
    secrets are open to others.

    Raises:
        InvalidArgument: A host other than loopback, no admin token, and no explicit permission.
    """
    local = is_loopback(config.host)
    if not config.admin_token:
        if not local and not config.allow_insecure_admin:
            raise InvalidArgument(
                f"binding {config.host!r} (not loopback) without an admin token would let anyone who reaches the port"
                " register and delete tasks: set an admin token, or allow_insecure_admin to accept that",
                field="admin_token",
            )
        log.warning(
            "no admin token is set: any client that reaches %s:%s may register and delete tasks",
            config.host,
            config.port,
        )
    if not local and not config.tls and (config.admin_token or config.api_key):
        log.warning("serving %s without TLS: tokens and prompts cross the network in clear text", config.host)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (`localhost`, 127.0.0.0/8, ::1); names other than localhost are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_tls_files(config: ServiceConfig) -> None:
    """Load the certificate, key and client CA once, so that a bad file fails the start with its field named."""
    if config.tls_cert is None or config.tls_key is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise InvalidArgument(
            f"cannot load the certificate {config.tls_cert} with the key {config.tls_key}: {exc}", field="tls_cert"
        ) from None
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise InvalidArgument(f"cannot load {config.tls_client_ca}: {exc}", field="tls_client_ca") from None


def grpc_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    """The gRPC door's TLS credentials (client certificates required with `tls_client_ca`); None without TLS."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def uvicorn_tls(config: ServiceConfig) -> dict[str, Any]:
    """The HTTP door's TLS options for `uvicorn.Config` (the same files as the gRPC door's); empty without TLS."""
    if config.tls_cert is None or config.tls_key is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
    if config.tls_client_ca is not None:
        options |= {"ssl_ca_certs": str(config.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
