"""What travels between the ingress and the engine replicas: requests as premoe.v1 protobuf bytes, the ingress's
routing decision as JSON values, and replies as an envelope holding protobuf bytes or a failure (status code name
and message). Domain errors never cross as exceptions: Ray would wrap them, and Serve's proxy would answer
INTERNAL; the status is decided here, by the single server's one mapping (`status_of`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from ..errors import PreMoeError, Unavailable
from ..server.interceptor import MAX_DETAILS, status_of
from ..server.wire import decode_error

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

# The premoe.v1 calls an engine replica answers with the single server's own door (`GrpcDoor`), unchanged.
DOOR_CALLS = frozenset({"Route", "RegisterTask", "ListTasks", "GetTask", "DeleteTask", "GetStats"})
# Task lifecycle calls: sent to the replica Serve's multiplexing picks for the task (`EngineReplica.lifecycle`).
LIFECYCLE_CALLS = frozenset({"LoadTask", "UnloadTask"})
REPLICA_HEADER = "premoe-replica"  # trailing metadata: which engine replica served the call


@dataclass(frozen=True)
class Routed:
    """The ingress's decision for a Generate call, handed to the engine replica.

    Attributes:
        decision: `override` (the request named its task: retrieval skipped), `match` or `fallback`.
        task: The task ("" for the fallback, which the engine replica routes again to build its pattern).
        score, ranked, reason: Retrieval's figures, as the single server reports them.
        route_s: Seconds the ingress spent routing.
    """

    decision: str
    task: str = ""
    score: float = 0.0
    ranked: list[tuple[str, float]] = field(default_factory=list)
    reason: str = ""
    route_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "task": self.task,
            "score": self.score,
            "ranked": [[t, s] for t, s in self.ranked],
            "reason": self.reason,
            "route_s": self.route_s,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Routed:
        return cls(
            str(value["decision"]),
            str(value.get("task", "")),
            float(value.get("score", 0.0)),
            [(str(t), float(s)) for t, s in value.get("ranked", [])],
            str(value.get("reason", "")),
            float(value.get("route_s", 0.0)),
        )


def reply(message: Any, replica: str) -> dict[str, Any]:
    """The envelope of a successful reply (a protobuf message)."""
    return {"reply": message.SerializeToString(), "replica": replica}


def failure(exc: BaseException, replica: str = "") -> dict[str, Any]:
    """The envelope of a failed call: the status the single server's interceptor would give `exc`."""
    if not isinstance(exc, PreMoeError):
        log.error("call failed", exc_info=exc)
    code, message = status_of(exc)
    return {"error": {"code": code.name, "message": clip(message)}, "replica": replica}


def status_of_call(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status of an exception raised around a Ray call: an engine replica that died or cannot be reached is
    UNAVAILABLE (a retry may reach another), the rest as the single server maps them."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        if isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError):
            exc = Unavailable(f"an engine replica went away ({type(exc).__name__})", field="replica")
    except ImportError:  # pragma: no cover - Ray is there whenever this module runs in a deployment
        pass
    code, message = status_of(exc)
    return code, clip(message)


def clip(message: str) -> str:
    """Status details travel in a trailer that clients cap (see the interceptor): long ones are cut."""
    return message if len(message) <= MAX_DETAILS else message[: MAX_DETAILS - 3] + "..."


def decode(raw: bytes, message: type[M]) -> M:
    """Request bytes as `message`; bytes that do not decode are `InvalidArgument` naming the field at fault, as the
    single server answers them."""
    try:
        return message.FromString(raw)
    except DecodeError:
        descriptor: Any = message.DESCRIPTOR
        raise decode_error(descriptor, raw) from None
