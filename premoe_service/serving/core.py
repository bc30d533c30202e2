"""The serving domain: route a prompt to a task, lease its experts, generate; task and stats queries."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..cores import default_engine_threads, usable_cores
from ..engine import BatchLimits, EngineLoop, GenerationResult, Request, RoutePlan, SamplingParams
from ..engine.kv import check_kv_tokens
from ..errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from ..pattern import Pattern
from ..profiler import Demo, Profile
from ..retrieval import (
    CheckedPrompt,
    Embedder,
    ProfileStore,
    RouteDecision,
    check_prompt,
    open_profile_store,
)
from ..runtime.build import load_model
from ..runtime.channel_slots import attach_channels
from ..runtime.eviction import SharedUseTracker
from ..runtime.lending import attach_lending
from ..runtime.quantized import attach_precisions
from ..store import Store, open_cache
from .config import ServiceConfig
from .limits import check_prompt_bytes, check_prompt_tokens, check_token_ids
from .loading import LoadResult, TaskLifecycle, UnloadResult
from .routing import build_registry
from .service_stats import ServiceStats, TaskCounters
from .tasks import TaskBook, TaskView
from .widen import widen_pattern
from .width import choose_width

log = logging.getLogger(__name__)


class ServingCore:
    """Everything the gRPC servicer calls; no gRPC types in here.

    Args:
        config: The service configuration.
        embedder: An already loaded embedder to share (tests load one per session).
    """

    def __init__(self, config: ServiceConfig, embedder: Embedder | None = None) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.cache = open_cache(config.redis_url)
        self.store = Store(config.store, self.cache)
        self.patterned, self.residency = load_model(
            self.store, config.budget_value, config.device, wait_timeout_s=config.lease_timeout_s
        )
        demote_to = _demotion(config, self.store)
        if demote_to:
            attach_lending(self.patterned, self.store, config.precision_slot_counts, demote_to)
        elif config.precision_slots:
            attach_precisions(self.patterned, self.store, config.precision_slot_counts)
        if config.channel_slots:
            attach_channels(self.patterned, self.store, config.channel_slot_counts, config.channel_variants)
        self.spec = self.patterned.spec
        self.tokenizer = AutoTokenizer.from_pretrained(self.store.dir, local_files_only=True)
        self.served_model_name = config.served_model_name or _model_name(self.store)
        # The logits' width: the ids a prompt may hold.
        self.vocab_size = int(getattr(self.patterned.config, "vocab_size", None) or len(self.tokenizer))
        profiler_engine, _ = load_model(
            self.store, device=self.patterned.device, capacity=0, dense=self.patterned.dense_state_dict()
        )
        self.embedder = embedder or Embedder(config.embedder, precision=config.embedder_precision)
        engine_threads = config.engine_threads or default_engine_threads()
        # Every embedding pass runs at one thread count, the C - E cores the engine's step leaves (at least one):
        # the embedder runs packed (`retrieval.packed`), so a prompt's vector is the same alone and beside others,
        # but another thread count may round it differently, and a prompt's task must not depend on what else
        # the server is doing. Every thread's parked OpenMP workers count against the cores (`intra_op`): the
        # engine's E - 1 and the embedder's C - E - 1 stay within them.
        leaves = max(1, usable_cores() - engine_threads)
        self.embedder.pass_threads = self.embedder.max_threads = leaves  # every pass, prompts' and tasks' alike
        self.registry = build_registry(config, self.store, self.patterned, self.embedder, self._profile_store())
        self.tasks = TaskBook(self.registry, self.store, self.spec, config.selection, profiler_engine)
        self.tasks.max_per_layer = min(slots.capacity for slots in self.patterned.slots.values())
        self.tasks.precision_slots = config.precision_slot_counts
        self.tasks.channel_slots = config.channel_slot_counts
        self.tasks.channel_criterion = config.channel_criterion
        self.counters: dict[str, TaskCounters] = {}
        # Submissions being tokenized and routed now: while the engine is idle, requests ready before them wait a
        # little for them (`BatchLimits.idle_hold_s`).
        self.arrivals = 0
        self._arrivals_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self.stopping = threading.Event()
        self.loop = EngineLoop(
            self.patterned,
            self.residency,
            self.store,
            eos=eos_ids(self.patterned.model),
            pad_id=self.tokenizer.pad_token_id or 0,
            limits=BatchLimits(
                config.max_batch_rows,
                config.max_batch_tokens,
                config.max_queue,
                max_join_wait_steps=config.join_wait_steps,
                max_kv_tokens=config.max_kv_tokens,
            ),
            stopping=self.stopping.is_set,
            threads=engine_threads,
            compiled=config.compile_step,
            observe=self._eviction_policy(config),
            widen=self._widen,
            count=self._count,
            arriving=lambda: self.arrivals,
        ).start()
        self.lifecycle = TaskLifecycle(
            self.registry,
            self.tasks,
            self.residency,
            self.loop,
            self.store.manifest.expert_nbytes,
            config.lease_timeout_s,
        )

    def _eviction_policy(self, config: ServiceConfig) -> Callable[[Pattern], None] | None:
        """For shared-use eviction, the tracker that counts each request's experts (the slots read its counts)."""
        if config.eviction != "shared-use":
            return None
        return SharedUseTracker(self.residency).observe

    def in_flight(self) -> list[Request]:
        """The requests queued or running in the engine loop now."""
        return self.loop.in_flight()

    def close(self) -> None:
        """Stop the engine loop (requests still queued or running fail with UNAVAILABLE)."""
        self.stopping.set()
        self.loop.close()

    def _profile_store(self) -> ProfileStore | None:
        """The profiles folder is the record; with Redis, the shared registry is kept in step with it."""
        return open_profile_store(self.config.profiles, self.config.redis_url, self.store.fingerprint)

    # --- routing -----------------------------------------------------------------------------------

    def route(self, prompt: str, task: str | None = None) -> RoutePlan:
        """The pattern for a prompt: the named task's, the matched task's, or the fallback. The prompt is checked
        here (its bytes, then `check_prompt`), once: the registry takes the checked prompt as it is."""
        check_prompt_bytes(prompt, self.config.max_prompt_bytes)
        return self._route(check_prompt(prompt), task)

    def _route(self, prompt: str, task: str | None) -> RoutePlan:
        """`route` for a prompt already checked."""
        if task:
            return self.task_plan(task)
        start = time.perf_counter()
        return self._plan(self.registry.route(prompt), start)

    def _submitted_plan(
        self, checked: CheckedPrompt | None, task: str | None, prompt: str | None, prompt_ids: Sequence[int] | None
    ) -> RoutePlan:
        """The plan of a submitted prompt: the task's when it names one; else routed on its text, `checked` with its
        tokens, or for token ids on their text (given, or decoded here), checked as retrieval reads it (token ids
        naming their task need no text: it may be blank, special tokens only)."""
        if task:
            return self.task_plan(task)
        if checked is not None:
            return self._route(checked, None)
        if prompt is None:
            prompt = str(self.tokenizer.decode(list(prompt_ids or ()), skip_special_tokens=True))
        return self.route(prompt)

    def task_plan(self, task: str) -> RoutePlan:
        """The plan of a request naming its task: the task's pattern, or every expert for the served model's own
        name."""
        start = time.perf_counter()
        if task == self.served_model_name:
            pattern = self._full_pattern()
        else:
            pattern = self.tasks.pattern(self.registry.get(task))
        return RoutePlan("override", task, 0.0, pattern, seconds=time.perf_counter() - start)

    def _full_pattern(self) -> Pattern:
        """Every routed expert, when the budget's slots can hold them all (never a silent subset)."""
        capacity = min(slots.capacity for slots in self.patterned.slots.values())
        if capacity < self.spec.num_experts:
            raise ResourceExhausted(
                f"the whole model {self.served_model_name!r} needs {self.spec.num_experts} experts per MoE layer; "
                f"the budget ({self.config.budget}) holds {capacity}: serve with a larger --budget, or ask for a "
                "task's pattern",
                field="budget",
            )
        return Pattern.full(self.spec)

    def _plan(self, decision: RouteDecision, start: float) -> RoutePlan:
        capacity = min(slots.capacity for slots in self.patterned.slots.values())
        record = self.registry.routing_record
        width = choose_width(
            decision, record.task_retention if record is not None else {}, all_fit=capacity >= self.spec.num_experts
        )
        reason = f"{decision.reason}; {width.why}" if width.why and width.wide else decision.reason
        # The decision carries the profiles it names, read with the search: a task deleted since is served as found.
        if decision.matched and decision.task is not None:
            pattern = self.tasks.pattern(_profile(decision, decision.task))
            return RoutePlan(
                "match",
                decision.task,
                float(decision.score or 0.0),
                Pattern.full(self.spec) if width.wide else pattern,
                decision.ranked,
                reason=reason,
                seconds=time.perf_counter() - start,
                similarity=decision.similarity,
                lead=decision.lead,
            )
        if width.wide:
            pattern = Pattern.full(self.spec)
        else:
            profiles = [_profile(decision, name) for name in decision.fallback_tasks]
            pattern = self.tasks.union_pattern(profiles, capacity)
        return RoutePlan(
            "fallback",
            "",
            float(decision.score or 0.0),
            pattern,
            decision.ranked,
            decision.fallback_tasks,
            reason,
            time.perf_counter() - start,
            decision.similarity,
            decision.lead,
        )

    # --- generation --------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        params: SamplingParams,
        *,
        task: str | None = None,
        deadline: float | None = None,
        cancelled: Callable[[], bool] | None = None,
        stream: bool = True,
    ) -> Iterator[str | GenerationResult]:
        """Yield text pieces (when `stream`), then one `GenerationResult`.

        The request joins the engine loop's batch once its experts are resident; closing the iterator
        early cancels it (its row and slots are freed at the next step).
        """
        yield from self.submit(
            prompt, params, task=task, deadline=deadline, cancelled=cancelled, stream=stream
        ).events()

    def submit(
        self,
        prompt: str | None,
        params: SamplingParams,
        *,
        task: str | None = None,
        deadline: float | None = None,
        cancelled: Callable[[], bool] | None = None,
        stream: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
        sink: Any = None,
        prompt_ids: Sequence[int] | None = None,
        add_special_tokens: bool = True,
        plan: RoutePlan | None = None,
    ) -> Request:
        """Tokenize and route a prompt and queue it in the engine loop: the returned request's `events()` (or
        `aevents()` on `loop` when one is given; put into `sink` on `loop` when that is given too) are its text pieces,
        then its one `GenerationResult`.

        `prompt_ids` are the prompt's tokens as the caller gave them: checked and used as they are (nothing added),
        with `prompt` their text for routing (None: decoded from them when retrieval picks the task). Otherwise
        `prompt` is tokenized, with the tokenizer's special tokens (BOS) unless `add_special_tokens` is False. A text
        prompt is checked unless a door did already (a `CheckedPrompt`); its bytes are measured against the server's
        limit before the tokenizer reads it. `plan` is a route made elsewhere (Ray's ingress), served as given
        instead of routing here."""
        if self.stopping.is_set():
            raise Unavailable("the server is shutting down", field="server")
        started = time.perf_counter()
        with self._arrivals_lock:
            self.arrivals += 1
        try:
            checked, ids = self._tokens(prompt, params, prompt_ids, add_special_tokens)
            if plan is None:
                plan = self._submitted_plan(checked, task, prompt, prompt_ids)
            request = Request(
                ids,
                plan.pattern,
                params,
                self.tokenizer,
                deadline=deadline,
                cancelled=cancelled or (lambda: False),
                stream=stream,
                coverage_floor=self.config.coverage_floor,
                wait_timeout_s=self.config.lease_timeout_s,
                loop=loop,
                sink=sink,
                plan=plan,
                times={"started": started},
            )
        finally:  # counted out before it is queued: the loop, woken by the queueing, sees it ready, not arriving
            with self._arrivals_lock:
                self.arrivals -= 1
        return self.loop.submit(request)

    def plan_generation(self, prompt: str, params: SamplingParams) -> RoutePlan:
        """The plan `submit` gives a text prompt that names no task, after the checks it makes first (a prompt too
        long for the model is refused before it is embedded and routed): what Ray's ingress asks a replica for
        before it chooses where the request goes."""
        checked, _ = self._tokens(prompt, params)
        return self._submitted_plan(checked, None, prompt, None)

    def _tokens(
        self,
        prompt: str | None,
        params: SamplingParams,
        prompt_ids: Sequence[int] | None = None,
        add_special_tokens: bool = True,
    ) -> tuple[CheckedPrompt | None, list[int]]:
        """Every check of a generation before any model work, and the prompt's tokens: a prompt too long is refused
        before it is embedded and routed. A text prompt comes back checked (`check_prompt`); token ids, with None."""
        params.check(self.config.max_new_tokens_limit)
        if params.stop_token_ids:
            check_token_ids(params.stop_token_ids, self.vocab_size, field="stop_token_ids")
        checked = None
        if prompt_ids is not None:
            ids = check_token_ids(prompt_ids, self.vocab_size)
        else:
            check_prompt_bytes(prompt, self.config.max_prompt_bytes)  # before the tokenizer reads it
            checked = check_prompt(prompt)  # a door's prompt passes as checked; routing then takes it as it is
            ids = self.tokenizer(checked, add_special_tokens=add_special_tokens)["input_ids"]
        context = getattr(self.patterned.config, "max_position_embeddings", None)
        check_prompt_tokens(
            len(ids), params.max_new_tokens, self.config.max_prompt_tokens, None if context is None else int(context)
        )
        check_kv_tokens(len(ids), params.max_new_tokens, self.config.max_kv_tokens)
        return checked, ids

    def preload(self, tasks: Sequence[str]) -> None:
        """Load the tasks' experts now (one one-token request each, through the engine loop), so that their
        first requests find them resident. Unknown tasks fail with NOT_FOUND naming `preload`."""
        for name in tasks:
            if name not in self.registry.names():
                raise NotFound(f"no task {name!r} to preload", field="preload")
            pattern = self.tasks.pattern(self.registry.get(name))
            ids = self.tokenizer(name)["input_ids"] or [self.tokenizer.pad_token_id or 0]
            request = Request(ids, pattern, SamplingParams(max_new_tokens=1), self.tokenizer, stream=False)
            *_, result = self.loop.submit(request).events()
            log.info("preloaded task %s: %s", name, result.loads if isinstance(result, GenerationResult) else result)

    def _widen(self, pattern: Pattern, prompt_scores: dict[int, torch.Tensor], floor: float) -> Pattern:
        """The engine loop's widening policy: the prompt's own experts added under the slots (`widen_pattern`)."""
        capacity = {layer: slots.capacity for layer, slots in self.patterned.slots.items()}
        return widen_pattern(self.spec, capacity, pattern, prompt_scores, floor)

    def _count(self, result: GenerationResult) -> None:
        """The engine loop's counting policy: a request served for its task (or the fallback), with its coverage;
        a cancelled one is not counted (its caller had gone)."""
        if result.finish_reason == "cancelled":
            return
        with self._counter_lock:
            counters = self.counters.setdefault(result.plan.task or "(fallback)", TaskCounters())
            counters.requests += 1
            counters.coverage_sum += result.coverage

    # --- tasks -------------------------------------------------------------------------------------

    def register_task(self, name: str, demos: list[Demo], **options: Any) -> TaskView:
        """Profile and register a task; `options` are `TaskBook.register`'s (description, selection, replace,
        dry_run, examples)."""
        if self.stopping.is_set():
            raise Unavailable("the server is shutting down", field="server")
        if name == self.served_model_name:
            raise AlreadyExists(f"{name!r} is the served model's own name (every expert)", field="name")
        return self.tasks.register(name, demos, **options)

    def list_tasks(self) -> list[TaskView]:
        views = []
        for name in self.registry.names():
            try:
                views.append(self._with_residency(self.tasks.view(self.registry.get(name), with_layers=False)))
            except NotFound:  # deleted since the names were read
                continue
        return views

    def get_task(self, name: str) -> TaskView:
        return self._with_residency(self.tasks.view(self.registry.get(name), with_layers=True))

    def delete_task(self, name: str) -> None:
        self.registry.delete(name)
        self.lifecycle.forget(name)

    def load_task(
        self, name: str, *, pin: bool = False, timeout_s: float | None = None, precision: str | None = None
    ) -> tuple[TaskView, LoadResult]:
        """Make a task's experts resident now (pinned with `pin`, at `precision`): `TaskLifecycle.load`."""
        if self.stopping.is_set():
            raise Unavailable("the server is shutting down", field="server")
        result = self.lifecycle.load(name, pin=pin, timeout_s=timeout_s, precision=precision)
        return self.get_task(name), result

    def unload_task(self, name: str) -> tuple[TaskView, UnloadResult]:
        """Unpin a task and release its experts' slots: `TaskLifecycle.unload`."""
        result = self.lifecycle.unload(name)
        return self.get_task(name), result

    def _with_residency(self, view: TaskView) -> TaskView:
        view.residency = self.lifecycle.residency_of(view.name, view.pattern)
        return view

    # --- stats -------------------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        """Bytes of routed experts resident on the device now (lowered ones at their packed size)."""
        return self.residency.resident_bytes(self.store.manifest.expert_nbytes)

    def stats(self) -> ServiceStats:
        loads = self.store.stats.loads
        nbytes = self.store.manifest.expert_nbytes
        with self._counter_lock:
            tasks = {name: (c.requests, c.coverage_sum / max(c.requests, 1)) for name, c in self.counters.items()}
        resident = self.residency.resident_experts()
        capacity = self.residency.capacity()
        return ServiceStats(
            resident_experts=resident,
            capacity_experts=capacity,
            resident_bytes=self.residency.resident_bytes(nbytes),
            budget_bytes=self.residency.capacity_bytes(nbytes),
            loads={tier: loads[tier] for tier in ("device", "cache", "disk")},
            loaded_bytes=self.store.stats.bytes["cache"] + self.store.stats.bytes["disk"],
            evictions=self.residency.stats.evictions,
            tasks=tasks,
            cache_health="degraded" if "degraded" in (self.store.health(), self.registry.health()) else "ok",
            in_flight=self.loop.stats.rows,
            queued=self.loop.stats.queued,
            generated_tokens=self.loop.stats.tokens,
            **self.residency.lending_counts(),
        )


def _profile(decision: RouteDecision, task: str) -> Profile:
    """The profile of a task the decision names, as the registry held it when it decided."""
    profile = decision.profiles.get(task)
    if profile is None:  # a configured general fallback task that is not registered
        raise NotFound(f"routing named task {task!r}, which is not registered", field="task")
    return profile


def eos_ids(model: Any) -> set[int]:
    """The model's end-of-sequence ids (generation config first, then model config)."""
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def _model_name(store: Store) -> str:
    """The name of the checkpoint folder the store was sharded from (the store's folder when it is not recorded)."""
    source = store.manifest.source.get("model_dir")
    return Path(source).name if isinstance(source, str) and Path(source).name else store.dir.name


def _demotion(config: ServiceConfig, store: Store) -> str | None:
    """The precision demotion serves from, or None: `demote` asks for it (the store must hold the copy), `auto` takes
    it when the store holds the copy and `--precision-slots` gives that precision no slots of its own."""
    from ..store.copies import quantized_copies

    if config.under_pressure == "wait":
        return None
    held = config.demote_to in quantized_copies(store.manifest)
    if config.under_pressure == "demote":
        if not held:
            raise FailedPrecondition(
                f"the store holds no {config.demote_to} copy to demote to: add it with premoe shard --precisions "
                f"{config.demote_to}, or serve with --under-pressure wait",
                field="demote_to",
            )
        return config.demote_to
    if not held or config.demote_to in config.precision_slot_counts:
        log.info(
            "under memory pressure requests wait (no %s copy to demote to without slots of its own)", config.demote_to
        )
        return None
    log.info(
        "under memory pressure requests take absent experts from the %s copy (--under-pressure auto)", config.demote_to
    )
    return config.demote_to
