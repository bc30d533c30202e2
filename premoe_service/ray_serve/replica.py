"""The engine deployment: one replica per device, each today's `ServingCore` (its engine loop, residency and
registry view), with the task's resident pattern as what Serve's model multiplexing loads and evicts."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ray import serve

from ..engine import SamplingParams
from ..errors import InvalidArgument, PreMoeError
from ..server.gen import premoe_pb2 as pb
from ..server.servicer import GrpcDoor
from ..server.types import GenerateCall, name_from_pb, stats_to_pb
from ..serving import GenerationResult, RoutePlan, ServingCore
from . import published_stats
from .calls import DOOR_CALLS, LIFECYCLE_CALLS, Routed, decode, failure, reply
from .holding import tasks_per_replica
from .http import HttpTunnel
from .proxy import SERVICE
from .settings import config_from_args, settings_from_args

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class TaskHold:
    """What Serve's multiplexing keeps per task on a replica: the task's pattern, made resident when Serve loaded
    it. Serve drops holds in LRU order past `tasks_per_replica`; the experts themselves leave only when the
    residency's own LRU needs their slots for another pattern (a dropped task may still find most of them)."""

    task: str
    experts: int


class EngineReplica:
    """One engine replica. Generate calls arrive with the task as the multiplexed model id (or none: fallback
    prompts, and Serve's default routing); every other premoe.v1 call is answered by the single server's door.

    Args:
        service: `ServiceConfig` values (see `settings.config_to_args`).
        deployment: `RaySettings` values.
    """

    def __init__(self, service: dict[str, Any], deployment: dict[str, Any]) -> None:
        config = config_from_args(service)
        self.settings = settings_from_args(deployment)
        self.core = ServingCore(config)
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="premoe-replica")
        self.door = GrpcDoor(self.core, self.executor)
        self.tunnel = HttpTunnel(self.core, self.executor)
        self.total_experts = self.core.spec.num_experts * len(self.core.spec.moe_layers)
        context = serve.get_replica_context()
        self.replica, self.app = context.replica_id.unique_id, context.app_name
        import redis

        self.redis = redis.Redis.from_url(config.redis_url or "", socket_timeout=1.0, socket_connect_timeout=1.0)
        self.tasks_per_replica = self.settings.tasks_per_replica or self._estimated_tasks()

        async def load_task(task: str) -> TaskHold:
            return await self._load_task(task)

        # Wired at init (Serve supports a multiplexed loader stored on the instance) so that its LRU size can come
        # from this replica's budget.
        self.hold: Callable[[str], Any] = serve.multiplexed(max_num_models_per_replica=self.tasks_per_replica)(
            load_task
        )
        if config.preload:
            self.core.preload(config.preload)  # every replica; Serve learns of them at their first request
        self._publish()
        log.info("engine replica %s: %d tasks per replica", self.replica, self.tasks_per_replica)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def _estimated_tasks(self) -> int:
        """How many registered tasks' patterns this replica's slots hold side by side (see `holding`)."""
        core = self.core
        slots = {layer: core.patterned.slots[layer].capacity for layer in core.spec.moe_layers}
        patterns = []
        for name in core.registry.names():
            pattern = core.tasks.pattern(core.registry.get(name))
            patterns.append({layer: frozenset(pattern.kept(layer)) for layer in core.spec.moe_layers})
        return tasks_per_replica(patterns, slots, core.spec.num_experts)

    async def _load_task(self, task: str) -> TaskHold:
        """Make the task's pattern resident (its missing experts loaded through the engine loop, as `--preload`)."""
        profile = await self._run(lambda: self.core.registry.get(task))
        await self._run(lambda: self.core.preload([task]))
        return TaskHold(task, self.core.tasks.pattern(profile).size)

    # --- generation ------------------------------------------------------------------------------------------

    async def generate(self, request: bytes, routed: dict[str, Any]) -> dict[str, Any]:
        """A unary Generate: the envelope of a `GenerateResponse`."""
        try:
            result: GenerationResult | None = None
            async for item in self._generate(request, Routed.from_json(routed), stream=False):
                result = item if isinstance(item, GenerationResult) else result
            if result is None:
                raise InvalidArgument("the request ended without a reply", field="server")
            message = pb.GenerateResponse(
                text=result.text,
                token_ids=result.token_ids,
                finish_reason=result.finish_reason,
                stats=stats_to_pb(result, self.total_experts),
            )
            return reply(message, self.replica)
        except Exception as exc:
            return failure(exc, self.replica)
        finally:
            await self._run(self._publish)

    async def generate_stream(self, request: bytes, routed: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A streaming Generate: envelopes of `GenerateChunk`s; a failure ends the stream."""
        try:
            async for item in self._generate(request, Routed.from_json(routed), stream=True):
                if isinstance(item, GenerationResult):
                    chunk = pb.GenerateChunk(
                        token_ids=item.token_ids,
                        finish_reason=item.finish_reason,
                        stats=stats_to_pb(item, self.total_experts),
                    )
                else:
                    chunk = pb.GenerateChunk(text=item)
                yield reply(chunk, self.replica)
        except Exception as exc:
            yield failure(exc, self.replica)
        finally:
            await self._run(self._publish)

    async def _generate(self, raw: bytes, routed: Routed, *, stream: bool) -> AsyncIterator[str | GenerationResult]:
        """Hold the task (Serve's multiplexing), submit to the engine loop, read its events on this event loop.
        Leaving early (the client went away) closes the events, which cancels the request at the next step."""
        call = GenerateCall.from_pb(decode(raw, pb.GenerateRequest))
        plan: RoutePlan | None = None  # no task: the fallback, routed on this replica
        if routed.task:
            task = routed.task
            plan = await self._run(lambda: self.core.task_plan(task))  # NOT_FOUND before anything is loaded
            if routed.decision == "match":  # the ingress retrieved the task: report it as the single server does
                plan = dataclasses.replace(
                    plan,
                    decision="match",
                    score=routed.score,
                    ranked=list(routed.ranked),
                    reason=routed.reason,
                    seconds=plan.seconds + routed.route_s,
                )
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.hold(model_id)
        loop = asyncio.get_running_loop()
        submitted = await self._run(
            lambda: self.core.submit(call.prompt, call.params, stream=stream, loop=loop, plan=plan)
        )
        async for item in submitted.aevents():
            yield item

    async def route(self, prompt: str) -> dict[str, Any]:
        """The ingress's retrieval for an HTTP prompt, as a `Routed`: `ServingCore.plan_generation` for the prompt and
        one new token, so a prompt too long for the model by itself is refused before it is embedded and routed
        (the ingress then forwards the request unrouted, and the replica's HTTP app answers it with its checks)."""
        return await self._routed(lambda: self.core.plan_generation(prompt, SamplingParams(max_new_tokens=1)))

    async def route_generate(self, raw: bytes) -> dict[str, Any]:
        """The ingress's retrieval for a Generate that names no task: `ServingCore.plan_generation`, which checks and
        tokenizes the prompt first (one too long for the model is refused before it is embedded and routed)."""

        def plan() -> RoutePlan:
            call = GenerateCall.from_pb(decode(raw, pb.GenerateRequest))
            return self.core.plan_generation(call.prompt, call.params)

        return await self._routed(plan)

    async def _routed(self, plan_of: Callable[[], RoutePlan]) -> dict[str, Any]:
        try:
            plan = await self._run(plan_of)
            routed = Routed(plan.decision, plan.task, plan.score, list(plan.ranked), plan.reason, plan.seconds)
            return {"routed": routed.to_json(), "replica": self.replica}
        except Exception as exc:
            return failure(exc, self.replica)

    async def http(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[dict[str, Any]]:
        """An HTTP request forwarded by the ingress, answered by the single server's HTTP app (see `http`)."""
        try:
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                try:
                    await self._run(lambda: self.core.registry.get(model_id))
                    await self.hold(model_id)
                except PreMoeError:
                    pass  # the app answers for an unknown task itself (404, OpenAI's error body)
            async for item in self.tunnel.run(method, path, query, headers, body):
                yield {**item, "replica": self.replica} if "status" in item else item
        finally:
            await self._run(self._publish)

    # --- the other calls -------------------------------------------------------------------------------------

    async def call(self, method: str, request: bytes) -> dict[str, Any]:
        """Route, task administration and queries: the single server's door on this replica's core (the task
        registry is shared through Redis and the profile folder, so any replica answers for all)."""
        try:
            if method not in DOOR_CALLS:
                raise InvalidArgument(f"not a call engine replicas answer: {method!r}", field="method")
            message = decode(request, getattr(pb, SERVICE.methods_by_name[method].input_type.name))
            answer = await getattr(self.door, method)(message, None)
            return reply(answer, self.replica)
        except Exception as exc:
            return failure(exc, self.replica)
        finally:
            await self._run(self._publish)

    async def lifecycle(self, method: str, request: bytes) -> dict[str, Any]:
        """LoadTask or UnloadTask on this replica, which Serve chose by the task as multiplexed model id: the one
        holding it, or the one its requests will now go to. A load first takes Serve's hold of the task here, so
        that Serve sends the task's requests to this replica; the reply names it."""
        try:
            if method not in LIFECYCLE_CALLS:
                raise InvalidArgument(f"not a task lifecycle call: {method!r}", field="method")
            message = decode(request, getattr(pb, SERVICE.methods_by_name[method].input_type.name))
            name = name_from_pb(message.name)
            if method == "LoadTask":
                await self._run(lambda: self.core.registry.get(name))  # NOT_FOUND before Serve's hold
                await self.hold(name)
            answer = await getattr(self.door, method)(message, None)
            answer.replicas.append(self.replica)
            return reply(answer, self.replica)
        except Exception as exc:
            return failure(exc, self.replica)
        finally:
            await self._run(self._publish)

    # --- lifecycle -------------------------------------------------------------------------------------------

    def _publish(self) -> None:
        """This replica's stats into Redis for the deployment's GetStats (a failure only logs: stats are not
        worth a request)."""
        try:
            published_stats.publish(
                self.redis,
                self.app,
                self.replica,
                self.core.stats(),
                self.settings.stats_ttl_s,
                tasks_per_replica=self.tasks_per_replica,
            )
        except Exception as exc:
            log.warning("could not publish replica stats: %s", exc)

    async def check_health(self) -> None:
        """Serve calls this periodically: a replica whose engine loop stopped is replaced."""
        if self.core.stopping.is_set():
            raise RuntimeError("the engine loop has stopped")
        await self._run(self._publish)

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None and not core.stopping.is_set():
            core.close()
