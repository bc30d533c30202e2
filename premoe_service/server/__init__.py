"""The gRPC edge: servicer, boundary types, the status-mapping interceptor, metrics, server assembly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServerApp, create_server, running_server, serve

__all__ = ["ServerApp", "create_server", "running_server", "serve"]


def __getattr__(name: str) -> Any:
    """Load the server (and torch with it) on first use, so that clients can import `server.gen` alone."""
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
