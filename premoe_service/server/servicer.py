"""The PreMoe servicer: each RPC decodes its request, calls one domain function off the event loop, encodes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from ..errors import DeadlineExceeded, Unavailable
from ..serving import GenerationResult, ServingCore
from .gen import premoe_pb2 as pb
from .gen import premoe_pb2_grpc as pb_grpc
from .metrics import Metrics
from .types import (
    GenerateCall,
    LoadCall,
    RegisterCall,
    load_to_pb,
    name_from_pb,
    route_to_pb,
    service_stats_to_pb,
    stats_to_pb,
    task_to_pb,
    unload_to_pb,
)

T = TypeVar("T")


class GrpcDoor(pb_grpc.PreMoeServicer):
    """Thin: no logic beyond decoding, one domain call, encoding. Errors are mapped by the interceptor."""

    def __init__(self, core: ServingCore, executor: ThreadPoolExecutor, metrics: Metrics | None = None) -> None:
        self.core = core
        self.executor = executor
        self.metrics = metrics
        self.total_experts = core.spec.num_experts * len(core.spec.moe_layers)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        result: GenerationResult | None = None
        async for item in self._generate(request, context, stream=False):
            result = item if isinstance(item, GenerationResult) else result
        if result is None:  # the engine always ends a request with its result or an error
            raise Unavailable("the request ended without a reply", field="server")
        self._observe(result, None)
        return pb.GenerateResponse(
            text=result.text,
            token_ids=result.token_ids,
            finish_reason=result.finish_reason,
            stats=stats_to_pb(result, self.total_experts),
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        start = time.perf_counter()
        first: float | None = None
        async for item in self._generate(request, context, stream=True):
            if isinstance(item, GenerationResult):
                self._observe(item, first)
                yield pb.GenerateChunk(
                    token_ids=item.token_ids,
                    finish_reason=item.finish_reason,
                    stats=stats_to_pb(item, self.total_experts),
                )
            else:
                if first is None:
                    first = time.perf_counter() - start
                yield pb.GenerateChunk(text=item)

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, *, stream: bool
    ) -> AsyncIterator[str | GenerationResult]:
        """Route and tokenize on the executor, then read the engine's events on this event loop (no thread
        waits per request); a client that goes away cancels the request at the next engine step."""
        call = GenerateCall.from_pb(request)
        deadline, cancelled = _deadline(context), _cancel_flag(context)
        loop = asyncio.get_running_loop()
        submitted = await self._run(
            lambda: self.core.submit(
                call.prompt,
                call.params,
                task=call.task,
                deadline=deadline,
                cancelled=cancelled.is_set,
                stream=stream,
                loop=loop,
            )
        )
        async for item in submitted.aevents():
            yield item

    def _observe(self, result: GenerationResult, ttft: float | None) -> None:
        if self.metrics is None:
            return
        if ttft is not None:
            self.metrics.ttft.observe(ttft)
        self.metrics.generation(
            result.plan.task,
            result.loads,
            result.timings,
            result.coverage,
            self.core.resident_bytes(),
        )

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        prompt = request.prompt
        return route_to_pb(await self._run(lambda: self.core.route(prompt)))

    async def RegisterTask(self, request: pb.RegisterTaskRequest, context: grpc.aio.ServicerContext) -> pb.TaskInfo:
        call = RegisterCall.from_pb(request, self.core.config)
        with call.request_fields():
            view = await self._run(
                lambda: self.core.register_task(
                    call.name,
                    call.demos,
                    description=call.description,
                    selection=call.selection,
                    replace=call.replace,
                    dry_run=call.dry_run,
                    examples=call.examples,
                )
            )
        return task_to_pb(view)

    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        return pb.ListTasksResponse(tasks=[task_to_pb(v) for v in await self._run(self.core.list_tasks)])

    async def GetTask(self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext) -> pb.TaskInfo:
        name = name_from_pb(request.name)
        return task_to_pb(await self._run(lambda: self.core.get_task(name)))

    async def DeleteTask(
        self, request: pb.DeleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteTaskResponse:
        name = name_from_pb(request.name)
        await self._run(lambda: self.core.delete_task(name))
        if self.metrics is not None:
            self.metrics.forget_task(name)
        return pb.DeleteTaskResponse(deleted=True)

    async def LoadTask(self, request: pb.LoadTaskRequest, context: grpc.aio.ServicerContext) -> pb.LoadTaskResponse:
        call = LoadCall.from_pb(request)
        view, result = await self._run(
            lambda: self.core.load_task(call.name, pin=call.pin, timeout_s=call.timeout_s, precision=call.precision)
        )
        return load_to_pb(view, result)

    async def UnloadTask(
        self, request: pb.UnloadTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadTaskResponse:
        name = name_from_pb(request.name)
        view, result = await self._run(lambda: self.core.unload_task(name))
        return unload_to_pb(view, result)

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetStatsResponse:
        return service_stats_to_pb(await self._run(self.core.stats))


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the monotonic clock; an already passed one fails before any work."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        raise DeadlineExceeded("the deadline passed before the request started", field="deadline")
    return time.monotonic() + remaining


def _cancel_flag(context: grpc.aio.ServicerContext) -> threading.Event:
    flag = threading.Event()
    context.add_done_callback(lambda _ctx: flag.set())
    return flag
