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
from .gen import premoe_pb2 as pb
from .metrics import Metrics
from .wire import Undecodable, tolerant

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
ADMIN_METHODS = frozenset({"RegisterTask", "DeleteTask", "LoadTask", "UnloadTask"})
# Status details travel in a trailer, and clients refuse trailers over 8 KiB by default (as INTERNAL): a message
# that quotes a long input is cut well below that.
MAX_DETAILS = 400  # characters: at most 1.6 KiB of UTF-8, 4.8 KiB once percent-encoded
METHODS = pb.DESCRIPTOR.services_by_name["PreMoe"].methods_by_name


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
        access: The credentials PreMoe RPCs need (health stays open); None: none.
        metrics: Request counters and latency histograms (optional).
    """

    def __init__(self, access: Access | None = None, metrics: Metrics | None = None) -> None:
        self.access = access or Access()
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
        deserialize = handler.request_deserializer
        if deserialize is not None and method in METHODS:
            deserialize = tolerant(deserialize, METHODS[method].input_type)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, admin, handler.unary_unary),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, admin, handler.unary_stream),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _admit(self, request: Any, context: grpc.aio.ServicerContext, admin: bool) -> None:
        """Check the credentials, then that the request decoded (no hints about requests to strangers)."""
        metadata = dict(context.invocation_metadata() or ())
        self.access.check(metadata.get("authorization"), admin=admin)
        if isinstance(request, Undecodable):
            raise request.error

    def _unary(self, method: str, admin: bool, behaviour: Any) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            if self.metrics is not None:
                self.metrics.in_progress.inc()
            try:
                failure = None
                try:
                    self._admit(request, context, admin)
                    return await behaviour(request, context)
                except Exception as exc:
                    failure = _detached(method, exc)
                # context.abort raises an exception whose traceback holds this frame, and gRPC keeps it in a
                # reference cycle that only the cyclic collector frees: the request (a prompt of megabytes) must
                # not be among this frame's locals by then.
                request = None
                code = _code(failure, context)
                await _abort(context, failure)
            finally:
                if self.metrics is not None:
                    self.metrics.request(method, code.name, time.perf_counter() - start)
                    self.metrics.in_progress.dec()

        return run

    def _stream(self, method: str, admin: bool, behaviour: Any) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            if self.metrics is not None:
                self.metrics.in_progress.inc()
            try:
                failure = None
                try:
                    self._admit(request, context, admin)
                    async for item in behaviour(request, context):
                        yield item
                except Exception as exc:
                    failure = _detached(method, exc)
                if failure is not None:
                    request = None  # as in `_unary`: the abort's traceback would keep the request alive
                    code = _code(failure, context)
                    await _abort(context, failure)
            finally:
                if self.metrics is not None:
                    self.metrics.request(method, code.name, time.perf_counter() - start)
                    self.metrics.in_progress.dec()

        return run


def _detached(method: str, exc: Exception) -> Exception:
    """`exc` without its traceback and context, once an unexpected one is logged with them: the traceback's
    frames hold the request (a prompt of megabytes), and the abort raised next would chain to it and keep it."""
    if not isinstance(exc, PreMoeError | grpc.aio.AbortError | grpc.RpcError):
        log.error("%s failed", method, exc_info=exc)
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    return exc


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End the call with the status of `exc` (always raises); an abort already under way passes through."""
    if isinstance(exc, grpc.aio.AbortError | grpc.RpcError):  # context.abort's own exception
        raise exc
    code, message = status_of(exc)
    if len(message) > MAX_DETAILS:
        message = message[: MAX_DETAILS - 3] + "..."
    await context.abort(code, message)


def _code(exc: Exception, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a failure ends the call with (for an abort already under way, the code it set)."""
    if isinstance(exc, grpc.aio.AbortError | grpc.RpcError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    return status_of(exc)[0]
