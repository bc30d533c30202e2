"""The HTTP admin paths of the task lifecycle (`GET /v1/tasks`, `GET /v1/tasks/{name}`,
`POST /v1/tasks/{name}/load|unload`), behind the admin token, over the same `ServingCore` calls as gRPC's ListTasks,
GetTask, LoadTask and UnloadTask."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidArgument
from ..names import check_task_name
from ..serving import ServingCore, TaskView
from ..serving.loading import LoadResult, UnloadResult
from .auth import Access
from .http_io import read_body
from .http_replies import Endpoint, error_reply
from .metrics import Metrics
from .types import PRECISIONS


class TaskDoor(Protocol):
    """What these paths use of the HTTP door (`http.TaskDoor`): the core, its executor, credentials and metrics."""

    core: ServingCore
    access: Access
    metrics: Metrics | None

    async def _run(self, fn: Callable[[], T]) -> T: ...


log = logging.getLogger(__name__)
T = TypeVar("T")
LOAD_FIELDS = frozenset({"pin", "timeout_s", "precision"})


def task_routes(api: TaskDoor) -> list[Route]:
    """The lifecycle routes of `api`'s app."""
    paths = TaskPaths(api)
    return [
        Route("/v1/tasks", paths.endpoint("/v1/tasks", paths.list), methods=["GET"]),
        Route("/v1/tasks/{name}", paths.endpoint("/v1/tasks/{name}", paths.get), methods=["GET"]),
        Route("/v1/tasks/{name}/load", paths.endpoint("/v1/tasks/{name}/load", paths.load), methods=["POST"]),
        Route("/v1/tasks/{name}/unload", paths.endpoint("/v1/tasks/{name}/unload", paths.unload), methods=["POST"]),
    ]


class TaskPaths:
    """Each path decodes, calls one `ServingCore` function on the door's executor, encodes; errors are the
    door's error JSON with the status of the gRPC code (a load that does not fit: 429)."""

    def __init__(self, api: TaskDoor) -> None:
        self.api = api

    async def list(self, request: Request) -> Response:
        views = await self.api._run(self.api.core.list_tasks)
        return JSONResponse({"object": "list", "data": [task_body(v) for v in views]})

    async def get(self, request: Request) -> Response:
        name = check_task_name(request.path_params["name"], field="name")
        view = await self.api._run(lambda: self.api.core.get_task(name))
        return JSONResponse({**task_body(view), "layers": layer_bodies(view)})

    async def load(self, request: Request) -> Response:
        name = check_task_name(request.path_params["name"], field="name")
        pin, timeout_s, precision = load_options(await options_body(request))
        core = self.api.core
        view, result = await self.api._run(
            lambda: core.load_task(name, pin=pin, timeout_s=timeout_s, precision=precision)
        )
        return JSONResponse(load_body(view, result))

    async def unload(self, request: Request) -> Response:
        name = check_task_name(request.path_params["name"], field="name")
        unknown = sorted(await options_body(request))
        if unknown:
            raise InvalidArgument("unload takes no options", field=unknown[0])
        core = self.api.core
        view, result = await self.api._run(lambda: core.unload_task(name))
        return JSONResponse(unload_body(view, result))

    def endpoint(self, name: str, handler: Endpoint) -> Endpoint:
        """`handler` behind the admin token, with the door's error mapping and request metrics."""
        api = self.api

        async def run(request: Request) -> Response:
            start = time.perf_counter()
            try:
                header = request.headers.get("authorization")
                api.access.check(header.encode("latin-1") if header is not None else None, admin=True)
                response = await handler(request)
                code = grpc.StatusCode.OK
            except Exception as exc:
                body, status, code = error_reply(exc)
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                response = JSONResponse(body, status_code=status, headers=headers)
            if api.metrics is not None:
                api.metrics.request(f"HTTP {name}", code.name, time.perf_counter() - start)
            return response

        return run


async def options_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body is no options (`{}`). Refused past the door's body limit."""
    raw = await read_body(request)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"the body is not valid JSON ({type(exc).__name__})", field="body") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"expected a JSON object, got {type(body).__name__}", field="body")
    return body


def load_options(body: dict[str, Any]) -> tuple[bool, float | None, str | None]:
    """`pin` (bool, default false), `timeout_s` (seconds >= 0, default the server's lease timeout) and `precision`
    (a lower precision's name, default none) of a load."""
    unknown = sorted(set(body) - LOAD_FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown field (a load takes {', '.join(sorted(LOAD_FIELDS))})", field=unknown[0])
    pin = body.get("pin", False)
    if not isinstance(pin, bool):
        raise InvalidArgument(f"must be true or false, got {pin!r:.40}", field="pin")
    timeout = body.get("timeout_s")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout < math.inf
    ):
        raise InvalidArgument(f"must be a finite number of seconds >= 0, got {timeout!r:.40}", field="timeout_s")
    precision = body.get("precision")
    if precision == "":  # as over gRPC: the task's own plan
        precision = None
    if precision is not None and precision not in PRECISIONS:
        raise InvalidArgument(f"must be one of {', '.join(PRECISIONS)}, got {precision!r:.40}", field="precision")
    return pin, float(timeout) if timeout else None, precision


def task_body(view: TaskView) -> dict[str, Any]:
    """A task as the HTTP paths show it: its pattern's size and bytes, and its residency now."""
    body: dict[str, Any] = {
        "name": view.name,
        "object": "task",
        "description": view.description,
        "criterion": view.criterion,
        "pattern_experts": view.pattern.size,
        "pattern_bytes": view.pattern_bytes,
        "pattern_precisions": view.pattern.precision_counts(),
        "experts_in_part": sum(len(cut) for cut in view.pattern.channels.values()),
        "demo_coverage": view.demo_coverage if math.isfinite(view.demo_coverage) else None,
        "created": view.created,
    }
    if view.residency is not None:
        state = view.residency.state
        body["residency"] = {
            "resident_share": state.share,
            "resident_experts": state.experts,
            "resident_bytes": state.nbytes,
            "precisions": state.precisions,
            "pinned": view.residency.pinned,
            "loading": view.residency.loading,
        }
    return body


def layer_bodies(view: TaskView) -> list[dict[str, Any]]:
    """Per MoE layer, as GetTask's `LayerExperts`: the kept experts, those held below full precision (expert ->
    precision) and those held in part (expert -> kept intermediate channels, a channel-level plan)."""
    pattern = view.pattern
    return [
        {
            "layer": layer,
            "experts": list(experts),
            "precisions": {str(e): p for e, p in sorted(pattern.precisions.get(layer, {}).items())},
            "channels": {str(e): len(ids) for e, ids in sorted(pattern.channels.get(layer, {}).items())},
        }
        for layer, experts in sorted(pattern.layers.items())
    ]


def load_body(view: TaskView, result: LoadResult) -> dict[str, Any]:
    loads = {tier: result.loads.get(tier, 0) for tier in ("device", "cache", "disk")}
    return {
        "task": task_body(view),
        "loads": {**loads, "bytes": result.loaded_bytes},
        "load_ms": result.seconds * 1000.0,
        "replicas": [],
    }


def unload_body(view: TaskView, result: UnloadResult) -> dict[str, Any]:
    return {
        "task": task_body(view),
        "was_pinned": result.was_pinned,
        "released_experts": result.released_experts,
        "released_bytes": result.released_bytes,
        "replicas": [],
    }
