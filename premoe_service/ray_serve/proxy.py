"""premoe.v1.PreMoe on Serve's gRPC proxy, as raw bytes: the servicer function Serve's `grpc_servicer_functions`
names. The proxy would otherwise decode each request with the generated classes and pickle the message to the
ingress, and our generated module's name (`premoe.v1.premoe_pb2`, from the proto's path) is not importable; bytes
also let the ingress decode them as the single server does, answering INVALID_ARGUMENT naming the field at fault
for undecodable ones instead of gRPC's UNKNOWN."""

from __future__ import annotations

from typing import Any

import grpc

from ..server.gen import premoe_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["PreMoe"]


def _unused(*_: Any) -> Any:  # Serve's proxy replaces every handler with its own
    raise NotImplementedError("served through Ray Serve's gRPC proxy")


def add_to_proxy(servicer: Any, server: Any) -> None:
    """Register every PreMoe method with no (de)serializer, so bytes pass through Serve's proxy untouched."""
    handlers = {
        method.name: (
            grpc.unary_stream_rpc_method_handler(_unused)
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler(_unused)
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
