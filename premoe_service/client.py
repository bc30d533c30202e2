"""A small typed Python client for the PreMoe gRPC API (the CLI's client verbs use it); it imports grpc and the
generated code only, never torch, so a client starts in a fraction of a second."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .server.gen import premoe_pb2 as pb
from .server.gen import premoe_pb2_grpc as pb_grpc


class PreMoeClient:
    """Blocking client.

    Args:
        target: `host:port` of a PreMoe server.
        api_key: The server's inference API key, sent as `authorization: Bearer <key>` on every PreMoe call but
            the admin calls (health checks never need it).
        admin_token: Sent as `authorization: Bearer <token>` on admin calls (RegisterTask, DeleteTask, LoadTask,
            UnloadTask).
        timeout: Default deadline in seconds of every call (None: none).
        tls: Connect over TLS (implied by the three below); without `tls_ca` the system's roots are trusted.
        tls_ca: PEM bundle of the CA(s) that signed the server's certificate (a self-signed deployment's CA).
        tls_cert: PEM certificate (chain) of this client, for a server that asks for one (mutual TLS).
        tls_key: PEM private key of `tls_cert`.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        timeout: float | None = None,
        tls: bool = False,
        tls_ca: bytes | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate (tls_cert, tls_key)")
        if tls or tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls_ca, private_key=tls_key, certificate_chain=tls_cert
            )
            self.channel = grpc.secure_channel(target, credentials)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.PreMoeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.api_key = api_key
        self.admin_token = admin_token
        self.timeout = timeout

    def __enter__(self) -> PreMoeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _admin(self) -> list[tuple[str, str]]:
        secret = self.admin_token or self.api_key  # without the token the server can say the key is not enough
        return [("authorization", f"Bearer {secret}")] if secret else []

    def _key(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    @staticmethod
    def request(
        prompt: str,
        *,
        task: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        expert_skip_threshold: float = 0.0,
        full_precision: bool = False,
    ) -> pb.GenerateRequest:
        request = pb.GenerateRequest(
            prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=list(stop)
        )
        request.expert_skip_threshold = expert_skip_threshold
        request.full_precision = full_precision
        if task is not None:
            request.task = task
        if seed is not None:
            request.seed = seed
        return request

    def generate(self, prompt: str, *, timeout: float | None = None, **options: object) -> pb.GenerateResponse:
        """One completion; options as in `request` (task, max_new_tokens, temperature, top_p, seed, stop)."""
        request = self.request(prompt, **options)  # type: ignore[arg-type]
        return self.stub.Generate(request, metadata=self._key(), timeout=timeout or self.timeout)

    def stream(self, prompt: str, *, timeout: float | None = None, **options: object) -> Iterator[pb.GenerateChunk]:
        """Text pieces as they are generated; the last chunk has the finish reason and stats."""
        request = self.request(prompt, **options)  # type: ignore[arg-type]
        yield from self.stub.GenerateStream(request, metadata=self._key(), timeout=timeout or self.timeout)

    def route(self, prompt: str) -> pb.RouteResponse:
        return self.stub.Route(pb.RouteRequest(prompt=prompt), metadata=self._key(), timeout=self.timeout)

    def register(
        self,
        name: str,
        demos: Sequence[str],
        *,
        description: str = "",
        criterion: str = "",
        experts_per_layer: int | None = None,
        fraction: float | None = None,
        bytes: int | None = None,
        precisions: Sequence[str] = (),
        replace: bool = False,
        dry_run: bool = False,
        timeout: float | None = None,
        examples: Sequence[str] = (),
    ) -> pb.TaskInfo:
        """Profile and register a task from demo texts (at most one of the three selections); with `precisions`
        its plan may hold experts at those lower precisions under the `bytes` or `fraction` budget."""
        request = pb.RegisterTaskRequest(
            name=name,
            description=description,
            demos=list(demos),
            criterion=criterion,
            replace=replace,
            dry_run=dry_run,
            precisions=list(precisions),
            examples=list(examples),
        )
        if experts_per_layer is not None:
            request.experts_per_layer = experts_per_layer
        if fraction is not None:
            request.fraction = fraction
        if bytes is not None:
            request.bytes = bytes
        return self.stub.RegisterTask(request, metadata=self._admin(), timeout=timeout or self.timeout)

    def tasks(self) -> list[pb.TaskInfo]:
        return list(self.stub.ListTasks(pb.ListTasksRequest(), metadata=self._key(), timeout=self.timeout).tasks)

    def get_task(self, name: str) -> pb.TaskInfo:
        return self.stub.GetTask(pb.GetTaskRequest(name=name), metadata=self._key(), timeout=self.timeout)

    def delete_task(self, name: str) -> bool:
        return self.stub.DeleteTask(
            pb.DeleteTaskRequest(name=name), metadata=self._admin(), timeout=self.timeout
        ).deleted

    def load_task(
        self,
        name: str,
        *,
        pin: bool = False,
        timeout_s: float = 0.0,
        precision: str = "",
        timeout: float | None = None,
    ) -> pb.LoadTaskResponse:
        """Make task `name`'s experts resident (pinned with `pin`; every one at `precision` when given, until
        unloaded); `timeout_s` bounds the wait for slots that running requests hold (0: the server's lease
        timeout)."""
        request = pb.LoadTaskRequest(name=name, pin=pin, timeout_s=timeout_s, precision=precision)
        return self.stub.LoadTask(request, metadata=self._admin(), timeout=timeout or self.timeout)

    def unload_task(self, name: str) -> pb.UnloadTaskResponse:
        """Unpin task `name` and release its experts' slots."""
        return self.stub.UnloadTask(pb.UnloadTaskRequest(name=name), metadata=self._admin(), timeout=self.timeout)

    def stats(self) -> pb.GetStatsResponse:
        return self.stub.GetStats(pb.GetStatsRequest(), metadata=self._key(), timeout=self.timeout)

    def health(self, service: str = "") -> str:
        """`SERVING`, `NOT_SERVING`, ... as reported by grpc.health.v1."""
        reply = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
