"""The one place where exceptions become gRPC status codes; also the credential checks and request metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ..errors import (
    AlreadyExists,
    DataCorruption,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreMoeError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .auth import Access
from .metrics import Metrics

log = logging.getLogger(__name__)

STATUS: list[tuple[type[PreMoeError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (DataCorruption, grpc.StatusCode.DATA_LOSS),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]
ADMIN_METHODS = frozenset({"RegisterTask", "DeleteTask"})


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an exception; unexpected ones are INTERNAL, never UNKNOWN."""
    if isinstance(exc, PreMoeError):
        for kind, code in STATUS:
            if isinstance(exc, kind):
                return code, str(exc)
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every PreMoe handler: credentials, status mapping, latency metrics.

    Args:
        admin_token: When set, admin RPCs need metadata `authorization: Bearer <token>`.
        metrics: Request counters and latency histograms (optional).
        api_key: When set, every other PreMoe RPC needs `authorization: Bearer <key>` (health stays open).
    """

    def __init__(
        self, admin_token: str | None = None, metrics: Metrics | None = None, *, api_key: str | None = None
    ) -> None:
        self.access = Access(admin_token, api_key)
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/premoe.v1.PreMoe/"):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        admin = method in ADMIN_METHODS
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, admin, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, admin, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _authorise(self, context: grpc.aio.ServicerContext, admin: bool) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.access.check(str(metadata.get("authorization", "")), admin=admin)

    def _unary(self, method: str, admin: bool, behaviour: Any) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self._authorise(context, admin)
                return await behaviour(request, context)
            except Exception as exc:
                code = await _abort(method, context, exc)
            finally:
                if self.metrics is not None:
                    self.metrics.request(method, code.name, time.perf_counter() - start)

        return run

    def _stream(self, method: str, admin: bool, behaviour: Any) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self._authorise(context, admin)
                async for item in behaviour(request, context):
                    yield item
            except Exception as exc:
                code = await _abort(method, context, exc)
            finally:
                if self.metrics is not None:
                    self.metrics.request(method, code.name, time.perf_counter() - start)

        return run


async def _abort(method: str, context: grpc.aio.ServicerContext, exc: Exception) -> grpc.StatusCode:
    """End the call with the status of `exc` (always raises); an abort already under way passes through."""
    if type(exc).__name__ == "AbortError" or isinstance(exc, grpc.RpcError):  # context.abort's own exception
        raise exc
    if not isinstance(exc, PreMoeError):
        log.error("%s failed", method, exc_info=exc)
    code, message = status_of(exc)
    await context.abort(code, message)
    return code  # not reached: abort raises
