"""The gRPC edge: servicer, boundary types, the status-mapping interceptor, metrics, server assembly."""

from .app import PreMoeServer, create_server, running_server, serve

__all__ = ["PreMoeServer", "create_server", "running_server", "serve"]
