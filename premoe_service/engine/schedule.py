"""Which ready requests join the batch at a step: arrival order within the free rows and the prompt-token budget."""

from __future__ import annotations

from collections.abc import Sequence

from .kv import reserved_tokens
from .request import Request, Status
from .stats import BatchLimits


def pick_joiners(
    waiting: Sequence[Request],
    running: int,
    limits: BatchLimits,
    step: int,
    pending: int = 0,
    reserved: int = 0,
    arriving: int = 0,
    now: float = 0.0,
) -> list[Request]:
    """The ready requests to join now, in arrival order; empty while they should wait.

    They fit the free rows, and join while the prompt-token budget of the next forward pass is not yet filled by
    the `pending` prompt tokens of rows still being fed and those of the requests chosen before them (prompts are
    fed in chunks, so the last one to join may start with part of its prompt). While rows decode, fewer than
    `join_ratio` x running ready requests may wait up to `max_join_wait_steps` steps for company (TGI's
    waiting-served ratio; 0 steps: join at once). With `limits.max_kv_tokens`, a request joins only while its
    reserved pool tokens fit beside the `reserved` tokens of the running requests and of those chosen before it; the
    first that does not fit stops the rest (no later request overtakes it, so a long one is not starved). While no
    row runs and `arriving` requests are still being routed, the ready ones wait for them until the oldest has been
    ready `limits.idle_hold_s` (`now` on `time.perf_counter`'s clock, as their `times["ready"]`).
    """
    room = limits.max_rows - running
    chosen: list[Request] = []
    tokens = pending
    for request in waiting:
        if request.status is not Status.READY or len(chosen) >= room:
            continue
        if tokens >= limits.max_prefill_tokens:
            break
        if limits.max_kv_tokens is not None:
            need = reserved_tokens(len(request.prompt_ids), request.params.max_new_tokens)
            if reserved + need > limits.max_kv_tokens:
                break
            reserved += need
        chosen.append(request)
        tokens += len(request.prompt_ids)
    if chosen and not running and arriving > 0 and now < hold_ends(chosen, limits):
        return []
    if chosen and running and len(chosen) < limits.join_ratio * running:
        oldest = min(int(r.times.get("ready_step", step)) for r in chosen)
        if step - oldest < limits.max_join_wait_steps:
            return []
    return chosen


def hold_ends(ready: Sequence[Request], limits: BatchLimits) -> float:
    """When an idle hold of `ready` requests ends (`time.perf_counter`): `limits.idle_hold_s` after the oldest of them
    became ready."""
    return min(float(r.times.get("ready", 0.0)) for r in ready) + limits.idle_hold_s
