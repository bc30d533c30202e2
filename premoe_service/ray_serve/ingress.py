"""The ingress deployment behind Serve's proxies: premoe.v1.PreMoe's methods (gRPC), each checking credentials,
retrieving the task of a Generate prompt (a request naming its task skips it), and forwarding to the engine
deployment with the task as Serve's multiplexed model id. Retrieval runs `ServingCore.plan_generation` (a Generate:
the prompt checked and tokenized before it is routed) or `ServingCore.route` (an HTTP prompt) on whichever engine
replica Serve picks: the single server's code exactly (embeddings, and the model's router signal, which needs the
model's first layers), with no second copy of the embedding model and index here. Serve's proxy runs none of our
interceptor, so the status of every failure is set here. HTTP requests (the OpenAI-compatible API) are forwarded
whole to a replica chosen the same way (see `http`)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from ray.serve.handle import DeploymentHandle

from ..errors import PreMoeError
from ..retrieval import CheckedPrompt, check_prompt
from ..server.auth import Access
from ..server.gen import premoe_pb2 as pb
from ..server.interceptor import ADMIN_METHODS
from ..server.types import GenerateCall, name_from_pb, service_stats_to_pb
from ..serving.limits import check_prompt_bytes
from . import published_stats
from .calls import REPLICA_HEADER, Routed, decode, status_of_call
from .http import model_of
from .proxy import SERVICE
from .settings import config_from_args, settings_from_args

log = logging.getLogger(__name__)
T = TypeVar("T")
LIFECYCLE_PATH = re.compile(r"/v1/tasks/([a-z0-9][a-z0-9_.-]{0,63})/(?:load|unload)")


class CallFailed(Exception):
    """A failure whose gRPC status is already set on the call's context (raised to end a stream with it)."""


class PreMoeIngress:
    """premoe.v1.PreMoe on Serve's gRPC proxy (the proxy calls the method named like the RPC).

    Args:
        engine: Handle of the engine deployment.
        service: `ServiceConfig` values; the ingress uses the credential, prompt and Redis settings.
        deployment: `RaySettings` values.
    """

    def __init__(self, engine: DeploymentHandle, service: dict[str, Any], deployment: dict[str, Any]) -> None:
        self.config = config_from_args(service)
        self.settings = settings_from_args(deployment)
        self.engine = engine
        self.access = Access(self.config.admin_token, self.config.api_key)
        import redis
        from ray import serve

        self.redis = redis.Redis.from_url(self.config.redis_url or "", socket_timeout=1.0)
        self.app = serve.get_replica_context().app_name

    # --- Generate -------------------------------------------------------------------------------------------

    async def Generate(self, request: bytes, grpc_context: Any) -> pb.GenerateResponse:
        try:
            handle, routed = await self._prepare(request, grpc_context)
            envelope = await handle.generate.remote(request, routed.to_json())
            return pb.GenerateResponse.FromString(self._open(envelope, grpc_context))
        except Exception as exc:
            self._set_status(grpc_context, exc)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: bytes, grpc_context: Any) -> AsyncIterator[pb.GenerateChunk]:
        try:
            handle, routed = await self._prepare(request, grpc_context)
            stream: Any = handle.options(stream=True).generate_stream.remote(request, routed.to_json())
            async for envelope in stream:
                yield pb.GenerateChunk.FromString(self._open(envelope, grpc_context))
        except CallFailed:
            raise
        except Exception as exc:
            self._set_status(grpc_context, exc)
            raise CallFailed(str(exc)) from None

    async def _prepare(self, raw: bytes, grpc_context: Any) -> tuple[DeploymentHandle, Routed]:
        """Credentials, the request's own checks, the task: the engine handle to send it to, and the decision."""
        self._admit(grpc_context, "Generate")
        call = GenerateCall.from_pb(decode(raw, pb.GenerateRequest))
        if call.task is not None:
            routed = Routed("override", call.task)
        else:
            check_prompt_bytes(call.prompt, self.config.max_prompt_bytes)  # before shipping it anywhere
            envelope = await self.engine.route_generate.remote(raw)  # checked and tokenized there before routing
            routed = Routed.from_json(self._open(envelope, grpc_context, "routed"))
        handle = self.engine
        if self.settings.affinity and routed.task:
            handle = handle.options(multiplexed_model_id=routed.task)
        return handle, routed

    # --- HTTP: the OpenAI-compatible door ------------------------------------------------------------------

    async def __call__(self, request: Any) -> Any:
        """Serve's HTTP proxy calls this: forward to a replica holding the body's `model` (for `auto` with a string
        prompt, the task retrieval picks), which answers with the single server's HTTP app, streamed back."""
        from starlette.responses import StreamingResponse

        body = await request.body()
        task, prompt = model_of(body)
        lifecycle = LIFECYCLE_PATH.fullmatch(request.url.path)
        if lifecycle is not None:  # /v1/tasks/{name}/load|unload: to the replica multiplexing picks for the task
            task, prompt = lifecycle.group(1), None
        routable = self._routable(request, prompt) if task is None and self.settings.affinity else None
        if routable is not None:
            envelope = await self.engine.route.remote(routable)
            routed = envelope.get("routed")
            task = routed["task"] if routed and routed["decision"] == "match" else None
        handle = self.engine.options(stream=True)
        if task and self.settings.affinity:
            handle = handle.options(multiplexed_model_id=task)
        query = request.url.query.encode("latin-1")
        stream: Any = handle.http.remote(request.method, request.url.path, query, list(request.headers.raw), body)
        start = await stream.__anext__()

        async def pieces() -> AsyncIterator[bytes]:
            async for item in stream:
                yield item["body"]

        response = StreamingResponse(pieces(), status_code=start["status"])
        replica = [(REPLICA_HEADER.encode(), str(start.get("replica", "")).encode())]
        response.raw_headers = [(bytes(k), bytes(v)) for k, v in start["headers"]] + replica
        return response

    def _routable(self, request: Any, prompt: str | None) -> CheckedPrompt | None:
        """The prompt of an `auto` HTTP request that earns retrieval before it is forwarded, checked: credentials
        that pass and a prompt within the limits, not blank (otherwise None, and the replica's HTTP app answers it
        with the single server's error)."""
        if prompt is None:
            return None
        header = request.headers.get("authorization")
        try:
            self.access.check(header.encode("latin-1") if header is not None else None, admin=False)
            check_prompt_bytes(prompt, self.config.max_prompt_bytes)
            return check_prompt(prompt)
        except PreMoeError:
            return None

    # --- the other calls: any engine replica answers them --------------------------------------------------

    async def Route(self, request: bytes, grpc_context: Any) -> pb.RouteResponse:
        return await self._forward("Route", request, pb.RouteResponse, grpc_context)

    async def RegisterTask(self, request: bytes, grpc_context: Any) -> pb.TaskInfo:
        return await self._forward("RegisterTask", request, pb.TaskInfo, grpc_context)

    async def ListTasks(self, request: bytes, grpc_context: Any) -> pb.ListTasksResponse:
        return await self._forward("ListTasks", request, pb.ListTasksResponse, grpc_context)

    async def GetTask(self, request: bytes, grpc_context: Any) -> pb.TaskInfo:
        return await self._forward("GetTask", request, pb.TaskInfo, grpc_context)

    async def DeleteTask(self, request: bytes, grpc_context: Any) -> pb.DeleteTaskResponse:
        return await self._forward("DeleteTask", request, pb.DeleteTaskResponse, grpc_context)

    async def LoadTask(self, request: bytes, grpc_context: Any) -> pb.LoadTaskResponse:
        return await self._lifecycle("LoadTask", request, pb.LoadTaskResponse, grpc_context)

    async def UnloadTask(self, request: bytes, grpc_context: Any) -> pb.UnloadTaskResponse:
        return await self._lifecycle("UnloadTask", request, pb.UnloadTaskResponse, grpc_context)

    async def _lifecycle(self, method: str, request: bytes, answer: type[T], grpc_context: Any) -> T:
        """To the replica Serve's multiplexing picks for the task (one that holds it, else the one its requests will
        go to); the reply's `replicas` names it."""
        try:
            self._admit(grpc_context, method)
            message = decode(request, getattr(pb, SERVICE.methods_by_name[method].input_type.name))
            name = name_from_pb(message.name)
            handle = self.engine.options(multiplexed_model_id=name) if self.settings.affinity else self.engine
            envelope = await handle.lifecycle.remote(method, request)
            return answer.FromString(self._open(envelope, grpc_context))  # type: ignore[attr-defined]
        except Exception as exc:
            self._set_status(grpc_context, exc)
            return answer()

    async def GetStats(self, request: bytes, grpc_context: Any) -> pb.GetStatsResponse:
        """The whole deployment's stats: every live engine replica's last published figures, summed."""
        try:
            self._admit(grpc_context, "GetStats")
            decode(request, pb.GetStatsRequest)
            records = await self._run(lambda: published_stats.gather(self.redis, self.app))
            return service_stats_to_pb(published_stats.merge(records))
        except Exception as exc:
            self._set_status(grpc_context, exc)
            return pb.GetStatsResponse()

    async def _forward(self, method: str, request: bytes, answer: type[T], grpc_context: Any) -> T:
        try:
            self._admit(grpc_context, method)
            decode(request, getattr(pb, SERVICE.methods_by_name[method].input_type.name))  # the bytes' own errors here
            envelope = await self.engine.call.remote(method, request)
            return answer.FromString(self._open(envelope, grpc_context))  # type: ignore[attr-defined]
        except Exception as exc:
            self._set_status(grpc_context, exc)
            return answer()

    # --- helpers --------------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    def _admit(self, grpc_context: Any, method: str) -> None:
        metadata = dict(grpc_context.invocation_metadata() or ())
        self.access.check(metadata.get("authorization"), admin=method in ADMIN_METHODS)

    def _open(self, envelope: dict[str, Any], grpc_context: Any, key: str = "reply") -> Any:
        """The envelope's `key` (a reply's bytes); a failure envelope sets its status on the call and raises
        `CallFailed`."""
        replica = str(envelope.get("replica", ""))
        if replica:
            grpc_context.set_trailing_metadata([(REPLICA_HEADER, replica)])
        error = envelope.get("error")
        if error is not None:
            grpc_context.set_code(_code(error["code"]))
            grpc_context.set_details(error["message"])
            raise CallFailed(error["message"])
        return envelope[key]

    @staticmethod
    def _set_status(grpc_context: Any, exc: BaseException) -> None:
        if isinstance(exc, CallFailed):
            return  # set from the engine replica's envelope
        if not isinstance(exc, PreMoeError):
            log.error("call failed", exc_info=exc)
        code, message = status_of_call(exc)
        grpc_context.set_code(code)
        grpc_context.set_details(message)


def _code(name: str) -> Any:
    import grpc

    return grpc.StatusCode[name]
