"""The engine process's end of the HTTP API's generation calls that come over the relay from the door process.

The door process reads the request's body and hands it over with the client's `authorization` header; here it is
checked, parsed and submitted as the in-process HTTP door does (`server/http.py`: the same fields, errors, statuses
and metrics), and the answer goes back as the bytes of the response's body: the whole JSON body, or the stream's
server-sent events, made on the engine's thread when its step hands its events over, one relay frame per step. So
the per-token work of a streamed reply in this process is one JSON encoding; its HTTP framing and socket writes
happen in the door process, under its own interpreter lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from starlette.responses import JSONResponse

from ..engine.request import EventSink, Failed
from ..serving import GenerationResult
from ..serving import Request as EngineRequest
from .gen import relay_pb2 as rpb
from .http import CHAT, OpenAIApi
from .http_io import sse, usage_so_far
from .http_replies import chunk_body, completion_body, error_reply, usage_chunk
from .http_types import PARAM_NAMES, GenerationCall, parse_body

DONE = b"data: [DONE]\n\n"


class HttpCall:
    """One relayed generation call: its requests' events in, the response's bytes out as relay events.

    Like the in-process door, it answers once every request has its first item, so that errors up to the first
    token get their own status: an error then is the whole response (its status and OpenAI's error body); after
    it, an error is the stream's last event. Not thread-safe: the relay link calls it under its lock.

    Args:
        api: The HTTP API whose parsing, submission, replies and metrics it shares.
        call_id: The relay's id of the call.
    """

    def __init__(self, api: OpenAIApi, call_id: int) -> None:
        self.api, self.call_id = api, call_id
        self.started = time.perf_counter()
        self.gone = threading.Event()  # the client left or one request failed: the others are cancelled
        self.call: GenerationCall | None = None
        self.chat = False
        self.submissions: list[EngineRequest] | None = None  # once all are queued
        self.firsts: dict[int, Any] = {}  # each request's first item, until the response starts
        self.later: list[tuple[int, Any]] = []  # items after a first, until the response starts
        self.results: list[GenerationResult] = []
        self.answering = False  # the response's status is out
        self.ttft = 0.0
        self.ended = False

    # --- in: the relay thread, then an executor thread ---------------------------------------------------

    def parse(self, path: str, body: bytes, authorization: str | None) -> GenerationCall:
        """Check the credentials and the body (raises our errors, as the in-process door's endpoint does)."""
        self.chat = path == CHAT
        self.api.access.check(authorization.encode("latin-1") if authorization is not None else None, admin=False)
        self.call = self.api.generation_call(path, parse_body(body))
        return self.call

    def submit(self, sink: Callable[[int], EventSink]) -> list[EngineRequest]:
        """Tokenize, route and queue the call's requests (an executor thread's work)."""
        assert self.call is not None
        return self.api.submit(self.call, self.gone, sink=sink)

    # --- out: relay events (the engine's thread, or the thread that saw an error) ------------------------

    def submitted(self, submissions: list[EngineRequest]) -> list[rpb.RelayEvent]:
        """Every request is queued; events that came meanwhile may complete the response's start."""
        self.submissions = submissions
        return self._start_if_ready()

    def take(self, index: int, item: Any) -> list[rpb.RelayEvent]:
        """The `index`-th request's engine event (a text piece, its result or its failure)."""
        if self.ended:
            return []
        if isinstance(item, Failed):
            return self.fail(item.error)
        if not self.answering:
            if index in self.firsts:
                self.later.append((index, item))
            else:
                self.firsts[index] = item
            return self._start_if_ready()
        return self._out(self._item(index, item))

    def fail(self, error: BaseException) -> list[rpb.RelayEvent]:
        """End the call with `error`: the whole response before its status is out, the stream's last event after."""
        if self.ended:
            return []
        self.gone.set()
        body, status, code = error_reply(error, PARAM_NAMES)
        if self.answering:
            return self._out(sse(body).encode(), code)
        self._record(code)
        self.ended = True
        reply = bytes(JSONResponse(body, status_code=status).body)
        return [rpb.RelayEvent(id=self.call_id, reply=reply, end=True, http_status=status)]

    def _start_if_ready(self) -> list[rpb.RelayEvent]:
        call, submissions = self.call, self.submissions
        if call is None or submissions is None or len(self.firsts) < len(submissions):
            return []
        self.answering = True
        self.ttft = time.perf_counter() - self.started
        if not call.stream:
            results = [self.firsts[i] for i in range(len(submissions))]
            if not all(isinstance(r, GenerationResult) for r in results):  # one that does not stream yields its result
                return self.fail(RuntimeError("expected each request's result"))
            for result in results:
                self.api.observe(result, None)
            self._record(grpc.StatusCode.OK)
            self.ended = True
            body = completion_body(call, results, self.api.total_experts, self.api.spelling)
            reply = bytes(JSONResponse(body).body)
            return [rpb.RelayEvent(id=self.call_id, reply=reply, end=True, http_status=200)]
        parts = []
        for index, submission in enumerate(submissions):
            if call.chat:
                parts.append(sse(chunk_body(call, index=index)).encode())  # the role delta
            if call.echo:
                echoed = "".join(self.api.spelling.pieces(submission.prompt_ids, False))
                parts.append(sse(chunk_body(call, echoed, index=index)).encode())
        items = [*sorted(self.firsts.items()), *self.later]
        self.firsts, self.later = {}, []
        parts.extend(self._item(index, item) for index, item in items)
        events = self._out(b"".join(parts))
        events[0].http_status, events[0].http_stream = 200, True
        return events

    def _item(self, index: int, item: Any) -> bytes:
        """One item of a streamed response as its event's bytes; the last result adds the usage and `[DONE]`."""
        call, submissions = self.call, self.submissions
        assert call is not None and submissions is not None
        if isinstance(item, GenerationResult):
            self.api.observe(item, self.ttft)
            self.results.append(item)
            event = sse(chunk_body(call, None, item, self.api.total_experts, index)).encode()
            if len(self.results) < len(submissions):
                return event
            usage = sse(usage_chunk(call, self.results)).encode() if call.stream_options.include_usage else b""
            return event + usage + DONE
        body = chunk_body(call, item, index=index)
        if call.stream_options.continuous_usage_stats:
            generated = sum(len(s.generated) for s in submissions)
            body["usage"] = usage_so_far(submissions[:: call.n], generated)
        return sse(body).encode()

    def _out(self, reply: bytes, code: grpc.StatusCode | None = None) -> list[rpb.RelayEvent]:
        """A relay event of the stream's bytes; it ends the call with `code`, or with OK once every result is out."""
        submissions = self.submissions
        if code is None and submissions is not None and len(self.results) == len(submissions):
            code = grpc.StatusCode.OK
        if code is not None:
            self._record(code)
            self.ended = True
        return [rpb.RelayEvent(id=self.call_id, reply=reply, end=self.ended)]

    def _record(self, code: grpc.StatusCode) -> None:
        self.api.record(self.chat, code, self.started)
