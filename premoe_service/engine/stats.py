"""Batch limits and the engine loop's live figures (read by metrics and stats)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument


@dataclass(frozen=True)
class BatchLimits:
    """How much the loop takes on at once.

    Attributes:
        max_rows: Requests decoding together in one forward pass.
        max_prefill_tokens: Prompt tokens in one forward pass, beside the decoding rows' tokens; longer prompts
            are fed in chunks over several passes (a prompt whose positions are scored, or whose coverage is
            checked, goes whole, alone when longer).
        max_queue: Requests waiting (for slots, loads or a row) before new ones get RESOURCE_EXHAUSTED.
        join_ratio: While rows decode, ready requests wait to be prefilled together until they number this
            share of the running rows (TGI's waiting-served ratio) ...
        max_join_wait_steps: ... or until the oldest has waited this many decode steps (0: join at once).
        idle_hold_s: While no row runs and other requests are still being tokenized and routed (the serving
            layer's count, `EngineLoop.arriving`), ready requests wait for them up to this long, so that a burst's
            prompts go in one pass instead of a lone first one taking the cores from the others' routing. A request
            that arrives alone never waits (0: never).
        max_kv_tokens: Tokens the KV pool may hold across the running requests; a request joins only while its
            prompt and max_new_tokens (in whole blocks, `kv.reserved_tokens`) fit beside those of the running ones,
            and the pool never grows past them. None: no cap (the pool doubles when it must).
    """

    max_rows: int = 32
    max_prefill_tokens: int = 4096
    max_queue: int = 256
    join_ratio: float = 0.3
    max_join_wait_steps: int = 2
    idle_hold_s: float = 0.03
    max_kv_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_kv_tokens is not None and self.max_kv_tokens < 1:
            raise InvalidArgument(f"must be at least 1, got {self.max_kv_tokens}", field="max_kv_tokens")
        for name in ("max_rows", "max_prefill_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"must be at least 1, got {getattr(self, name)}", field=name)
        if self.idle_hold_s < 0:
            raise InvalidArgument(f"must be at least 0, got {self.idle_hold_s}", field="idle_hold_s")
        if self.max_join_wait_steps < 0 or not 0 <= self.join_ratio <= 1:
            raise InvalidArgument("join_ratio lies in [0, 1], max_join_wait_steps >= 0", field="max_join_wait_steps")


PHASES = (
    "schedule",  # inbox, loads committed, expiry, admission, choosing joiners
    "inputs",  # token ids, mask, positions, KV bookkeeping and the routing context of the forward pass
    "forward",  # the model's forward pass
    "sampling",  # the next token of every row
    "coverage",  # per-row coverage and skipped experts from what routing saw
    "text",  # each row's token appended and its text decoded (stop strings, log-probabilities)
    "events",  # text pieces and outcomes handed to the doors
)


@dataclass
class LoopStats:
    """Figures of the running loop; written by the loop thread only, read by anyone."""

    rows: int = 0  # requests in the batch
    queued: int = 0  # requests submitted and not yet in the batch
    waiting_slots: int = 0
    loading: int = 0
    ready: int = 0  # experts resident, waiting for a row
    loader_backlog: int = 0
    bytes_in_flight: int = 0
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    tokens: int = 0
    kv_blocks: int = 0  # blocks of the KV pool (`KVPool`), held or free
    kv_blocks_held: int = 0  # blocks the running requests hold
    kv_bytes: int = 0  # bytes of the KV pool's tensors
    kv_reserved_tokens: int = 0  # under `BatchLimits.max_kv_tokens`: the tokens the running requests reserve
    last_step_s: float = 0.0
    step_seconds: float = 0.0
    # Seconds spent per part of the steps (`PHASES`), summed since start: where a step's time goes.
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def observe(self, waiting: Sequence[Any], rows: int, inbox: int, loader: Any, pool: Any, reserved: int = 0) -> None:
        """The queue, loader and KV pool figures after a step (`waiting`: the loop's queue of requests; `reserved`:
        the running requests' reserved KV tokens under a cap)."""
        from .request import Status

        self.rows, self.queued = rows, len(waiting) + inbox
        self.waiting_slots = sum(r.status is Status.WAITING_SLOTS for r in waiting)
        self.loading = sum(r.status is Status.LOADING for r in waiting)
        self.ready = sum(r.status is Status.READY for r in waiting)
        self.loader_backlog, self.bytes_in_flight = loader.backlog, loader.bytes_in_flight
        self.kv_blocks, self.kv_blocks_held, self.kv_bytes = pool.blocks, pool.held_blocks, pool.nbytes()
        self.kv_reserved_tokens = reserved

    def add(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] += seconds

    def record_step(self, seconds: float) -> None:
        self.steps += 1
        self.last_step_s = seconds
        self.step_seconds += seconds
