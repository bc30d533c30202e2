"""Which ready requests join the batch at a step: arrival order within the row and prefill-token limits."""

from __future__ import annotations

from collections.abc import Sequence

from .request import Request, Status
from .stats import BatchLimits


def pick_joiners(waiting: Sequence[Request], running: int, limits: BatchLimits, step: int) -> list[Request]:
    """The ready requests to prefill together now, in arrival order; empty while they should wait.

    They fit the free rows and the padded prefill-token budget (one request longer than the budget still goes
    alone). A request that scores its prompt needs every position's logits and is prefilled on its own. While
    rows decode, fewer than `join_ratio` x running ready requests wait up to `max_join_wait_steps` steps for
    company, since every prefill is a forward pass the running rows wait for (TGI's waiting-served ratio).
    """
    room = limits.max_rows - running
    chosen: list[Request] = []
    for request in waiting:
        if request.status is not Status.READY or len(chosen) >= room:
            continue
        scoring = request.params.prompt_logprobs
        if chosen and scoring:
            continue
        longest = max([len(request.prompt_ids), *(len(r.prompt_ids) for r in chosen)])
        if chosen and longest * (len(chosen) + 1) > limits.max_prefill_tokens:
            break
        chosen.append(request)
        if scoring:
            break
    if chosen and running and len(chosen) < limits.join_ratio * running:
        oldest = min(int(r.times.get("ready_step", step)) for r in chosen)
        if step - oldest < limits.max_join_wait_steps:
            return []
    return chosen
