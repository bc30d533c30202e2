"""The OpenAI-compatible HTTP door: a Starlette app over the gRPC server's own ServingCore (served by
`http_door.HttpDoor`); each endpoint decodes, calls one domain function off the loop, encodes."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.request import EventSink
from ..errors import InvalidArgument, PreMoeError
from ..names import check_task_name
from ..serving import GenerationResult, ServingCore
from ..serving import Request as EngineRequest
from .auth import Access
from .chat import ChatTemplate
from .http_io import merged, read_json, sse, usage_so_far, watch_disconnect
from .http_replies import (
    ERROR_TYPES,
    Endpoint,
    Spelling,
    chunk_body,
    completion_body,
    error_body,
    error_reply,
    full_model_body,
    model_body,
    usage_chunk,
)
from .http_tasks import task_routes
from .http_tokens import detokenize_body, text_pieces, tokenize_body, tokenizer_info_body
from .http_types import AUTO, PARAM_NAMES, GenerationCall, Prompt
from .metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"  # the generation endpoints


class OpenAIApi:
    """The endpoints. Errors become OpenAI's error JSON with the status of the gRPC door's code.

    Args:
        core: The ServingCore the gRPC door uses.
        executor: Threads that wait on the core (the gRPC door's).
        access: The credentials inference calls need.
        serving: Set while the server serves (health reports 503 otherwise).
        metrics: Request latency (method label `HTTP <path>`), time to first token, loads, coverage.
    """

    def __init__(
        self,
        core: ServingCore,
        executor: ThreadPoolExecutor,
        access: Access,
        serving: threading.Event,
        metrics: Metrics | None = None,
    ) -> None:
        self.core = core
        self.executor = executor
        self.access = access
        self.serving = serving
        self.metrics = metrics
        self.total_experts = core.spec.num_experts * len(core.spec.moe_layers)
        tokenizer = core.tokenizer
        self.template = ChatTemplate(tokenizer, core.config.chat_template)
        self.spelling = Spelling(self._spell, lambda ids, skip: text_pieces(tokenizer, ids, skip))
        context = getattr(core.patterned.config, "max_position_embeddings", None)
        self.context = None if context is None else int(context)

    def app(self) -> Starlette:
        routes = [
            Route(COMPLETIONS, self._endpoint(COMPLETIONS, self.completions), methods=["POST"]),
            Route(CHAT, self._endpoint(CHAT, self.chat), methods=["POST"]),
            Route("/v1/models", self._endpoint("/v1/models", self.models), methods=["GET"]),
            Route("/v1/models/{model}", self._endpoint("/v1/models/{model}", self.model), methods=["GET"]),
            Route("/tokenize", self._endpoint("/tokenize", self.tokenize), methods=["POST"]),
            Route("/detokenize", self._endpoint("/detokenize", self.detokenize), methods=["POST"]),
            Route("/tokenizer_info", self._endpoint("/tokenizer_info", self.tokenizer_info), methods=["GET"]),
            Route("/health", self._endpoint("/health", self.health, open_=True), methods=["GET"]),
            *task_routes(self),  # the task lifecycle's admin paths
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: _routing_error})

    # --- endpoints ---------------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, self.generation_call(COMPLETIONS, await read_json(request)))

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, self.generation_call(CHAT, await read_json(request)))

    def generation_call(self, path: str, body: dict[str, Any]) -> GenerationCall:
        """The call a generation endpoint's body asks for, its fields checked (`path`: COMPLETIONS or CHAT)."""
        call = GenerationCall.from_chat(body, self.template) if path == CHAT else GenerationCall.from_completion(body)
        if call.model not in (AUTO, self.core.served_model_name):
            check_task_name(call.model, field="model")
        return call

    async def models(self, request: Request) -> Response:
        views = await self._run(self.core.list_tasks)
        full = full_model_body(self.core.served_model_name, self.total_experts, self.context)
        return JSONResponse({"object": "list", "data": [model_body(None), full, *(model_body(v) for v in views)]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name == AUTO:
            return JSONResponse(model_body(None))
        if name == self.core.served_model_name:
            return JSONResponse(full_model_body(name, self.total_experts, self.context))
        check_task_name(name, field="model")
        return JSONResponse(model_body(await self._run(lambda: self.core.get_task(name))))

    async def tokenize(self, request: Request) -> Response:
        body = await read_json(request)
        await self._known_model(body.get("model"))
        core = self.core
        return JSONResponse(
            await self._run(lambda: tokenize_body(body, core.tokenizer, self.template, core.vocab_size, self.context))
        )

    async def detokenize(self, request: Request) -> Response:
        body = await read_json(request)
        await self._known_model(body.get("model"))
        return JSONResponse(await self._run(lambda: detokenize_body(body, self.core.tokenizer, self.core.vocab_size)))

    async def _known_model(self, model: object) -> None:
        """An optional `model` of the tokenizer endpoints: every model shares the tokenizer, but a name that
        serves nothing is still an error (404), not ignored."""
        if model is None or model in (AUTO, self.core.served_model_name):
            return
        if not isinstance(model, str):
            raise InvalidArgument(f"expected a model name, got {model!r:.40}", field="model")
        name = check_task_name(model, field="model")
        await self._run(lambda: self.core.get_task(name))

    async def tokenizer_info(self, request: Request) -> Response:
        return JSONResponse(tokenizer_info_body(self.core.tokenizer, self.template.source, self.context))

    async def health(self, request: Request) -> Response:
        serving = self.serving.is_set() and not self.core.stopping.is_set()
        status = "SERVING" if serving else "NOT_SERVING"
        return JSONResponse({"status": status}, status_code=200 if serving else 503)

    # --- generation --------------------------------------------------------------------------------------

    async def _generate(self, request: Request, call: GenerationCall) -> Response:
        """Wait for every prompt's first item before answering, so that errors up to the first token get their
        own status."""
        gone = threading.Event()
        watcher = asyncio.create_task(watch_disconnect(request, gone))
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:  # route and tokenize on the executor; the engine's events then arrive on this event loop
            submissions = await self._run(lambda: self.submit(call, gone, loop))
        except BaseException:
            watcher.cancel()
            raise
        streams = [submitted.aevents() for submitted in submissions]
        try:
            firsts = await asyncio.gather(*(anext(items) for items in streams))
        except BaseException:
            gone.set()  # the other prompts' requests end too
            watcher.cancel()
            for items in streams:
                await items.aclose()
            raise
        if call.stream:
            events = self._events(call, submissions, firsts, streams, watcher, start, time.perf_counter() - start)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher.cancel()
        for items in streams:
            await items.aclose()
        results = []
        for first in firsts:
            if not isinstance(first, GenerationResult):  # a request that does not stream yields its result only
                raise RuntimeError(f"expected the result, got {type(first).__name__}")
            self.observe(first, None)
            results.append(first)
        return JSONResponse(completion_body(call, results, self.total_experts, self.spelling))

    def submit(
        self,
        call: GenerationCall,
        gone: threading.Event,
        loop: asyncio.AbstractEventLoop | None = None,
        sink: Callable[[int], EventSink] | None = None,
    ) -> list[EngineRequest]:
        """Queue each prompt (each of its `n` choices) as a request of its own, its events read on `loop` or put
        into `sink(i)` (the i-th request's); if one is refused, those already queued are cancelled and the error
        names the prompt (`prompt[i]` when there are several)."""
        submissions: list[EngineRequest] = []
        for index, prompt in enumerate(call.prompts):
            try:
                # n samples need n random streams: without a seed they get a random one (an unseeded request's
                # generator starts from torch's fixed default, so n of them would all draw alike).
                seed = call.params.seed if call.params.seed is not None or call.n == 1 else secrets.randbits(63)
                for sample in range(call.n):
                    where = sink(len(submissions)) if sink is not None else None
                    submissions.append(self._submit_one(call, prompt, seed, sample, gone, loop, where))
            except PreMoeError as exc:
                gone.set()
                if len(call.prompts) > 1 and exc.field == "prompt":
                    raise type(exc)(exc.message, field=f"prompt[{index}]") from None
                raise
            except BaseException:
                gone.set()
                raise
        return submissions

    def _submit_one(
        self,
        call: GenerationCall,
        prompt: Prompt,
        seed: int | None,
        sample: int,
        gone: threading.Event,
        loop: asyncio.AbstractEventLoop | None,
        sink: EventSink | None,
    ) -> EngineRequest:
        """The `sample`-th choice of a prompt, drawn with seed + sample (vLLM's rule for n samples)."""
        params = call.params
        if seed is not None:
            params = replace(params, seed=(seed + sample) % 2**63)
        return self.core.submit(
            prompt.text,
            params,
            task=call.task,
            cancelled=gone.is_set,
            stream=call.stream,
            loop=loop,
            sink=sink,
            prompt_ids=prompt.ids,
            add_special_tokens=call.add_special_tokens,
        )

    async def _events(
        self,
        call: GenerationCall,
        submissions: list[EngineRequest],
        firsts: list[str | GenerationResult],
        streams: list[AsyncGenerator[str | GenerationResult, None]],
        watcher: asyncio.Task[None],
        start: float,
        ttft: float,
    ) -> AsyncIterator[str]:
        code = grpc.StatusCode.CANCELLED
        options = call.stream_options
        results: list[GenerationResult] = []
        events = merged(firsts, streams)
        try:
            for index, submission in enumerate(submissions):
                if call.chat:
                    yield sse(chunk_body(call, index=index))  # the role delta
                if call.echo:
                    echoed = "".join(self.spelling.pieces(submission.prompt_ids, False))
                    yield sse(chunk_body(call, echoed, index=index))
            async for index, item in events:
                if isinstance(item, GenerationResult):
                    self.observe(item, ttft)
                    results.append(item)
                    yield sse(chunk_body(call, None, item, self.total_experts, index))
                else:
                    body = chunk_body(call, item, index=index)
                    if options.continuous_usage_stats:
                        generated = sum(len(s.generated) for s in submissions)
                        body["usage"] = usage_so_far(submissions[:: call.n], generated)
                    yield sse(body)
            if options.include_usage:
                yield sse(usage_chunk(call, results))
            yield "data: [DONE]\n\n"
            code = grpc.StatusCode.OK
        except Exception as exc:  # the 200 is out: the error goes in the stream, as OpenAI's servers send it
            body, _status, code = error_reply(exc, PARAM_NAMES)
            yield sse(body)
        finally:  # also when the client went away and the response task was cancelled
            await events.aclose()  # its pumps stop reading the streams before they are closed
            watcher.cancel()
            for items in streams:
                await items.aclose()
            self.record(call.chat, code, start)

    def _spell(self, token: int) -> str:
        """One token's text, as the `logprobs` object lists it."""
        return str(self.core.tokenizer.decode([token]))

    # --- plumbing ----------------------------------------------------------------------------------------

    def _endpoint(self, name: str, handler: Endpoint, *, open_: bool = False) -> Endpoint:
        async def run(request: Request) -> Response:
            start = time.perf_counter()
            try:
                if not open_:  # the header's raw bytes (Starlette decodes headers as Latin-1)
                    header = request.headers.get("authorization")
                    self.access.check(header.encode("latin-1") if header is not None else None, admin=False)
                response = await handler(request)
            except Exception as exc:
                body, status, code = error_reply(exc, PARAM_NAMES)
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                response, streaming = JSONResponse(body, status_code=status, headers=headers), False
            else:
                code, streaming = grpc.StatusCode.OK, isinstance(response, StreamingResponse)
            if self.metrics is not None and not streaming:  # a stream records itself when it ends
                self.metrics.request(f"HTTP {name}", code.name, time.perf_counter() - start)
            return response

        return run

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def observe(self, result: GenerationResult, ttft: float | None) -> None:
        if self.metrics is None:
            return
        if ttft is not None:
            self.metrics.ttft.observe(ttft)
        resident = self.core.resident_bytes()
        self.metrics.generation(result.plan.task, result.loads, result.timings, result.coverage, resident)

    def record(self, chat: bool, code: grpc.StatusCode, start: float) -> None:
        if self.metrics is not None:
            path = CHAT if chat else COMPLETIONS
            self.metrics.request(f"HTTP {path}", code.name, time.perf_counter() - start)


async def _routing_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"no endpoint {request.method} {request.url.path}" if status in (404, 405) else str(exc)
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "server_error"), None, None), status_code=status)
