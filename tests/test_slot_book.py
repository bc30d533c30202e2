"""The slot book's array planning against a plain per-expert reference, over random reserve/commit/abort/unpin
histories: same copies, same victims, same refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from premoe_service.errors import ResourceExhausted
from premoe_service.runtime.slot_book import ABSENT, FREE, RESIDENT, SlotBook, wanted_mask

EXPERTS = 12


def reference_plan(book: SlotBook, wanted: list[set[int]]) -> list[tuple[int, int, int]]:
    """What a loop over experts decides: missing experts in id order take free slots in slot order, then the
    slots of evictable experts ordered by (use, last use, id)."""
    copies = []
    for row, experts in enumerate(wanted):
        missing = sorted(e for e in experts if book.state[row, e] == ABSENT)
        if not missing:
            continue
        targets = [s for s in range(int(book.capacity[row])) if book.expert_in_slot[row, s] == FREE]
        short = len(missing) - len(targets)
        if short > 0:
            evictable = [
                e
                for e in range(EXPERTS)
                if book.state[row, e] == RESIDENT and e not in experts and book.pins[row, e] == 0
            ]
            if short > len(evictable):
                raise ResourceExhausted("does not fit", field=f"layer {book.names[row]}")
            use = book.use[row] if book.use is not None else np.zeros(EXPERTS)
            evictable.sort(key=lambda e: (use[e], book.last_used[row, e], e))
            targets += [int(book.slot[row, e]) for e in evictable[:short]]
        copies += [(row, e, s) for e, s in zip(missing, targets, strict=False)]
    return copies


step = st.tuples(
    st.lists(st.sets(st.integers(0, EXPERTS - 1), max_size=6), min_size=3, max_size=3),  # wanted per row
    st.integers(0, 3),  # 0: commit all, 1: abort all, 2: commit half, 3: leave loading
    st.booleans(),  # unpin the oldest lease afterwards
)


@settings(max_examples=150, deadline=None)
@given(
    capacities=st.lists(st.integers(3, 8), min_size=3, max_size=3),
    history=st.lists(step, min_size=1, max_size=12),
    shared_use=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_array_planning_matches_a_per_expert_reference(capacities, history, shared_use, seed) -> None:
    book = SlotBook(capacities, EXPERTS, names=[3, 4, 5])
    if shared_use:
        book.use = np.random.default_rng(seed).integers(0, 3, (3, EXPERTS)).astype(float)
    leases: list[np.ndarray] = []
    tick = 0
    for wanted_sets, outcome, release in history:
        wanted = wanted_mask(3, EXPERTS, [sorted(w) for w in wanted_sets])
        try:
            expected = reference_plan(book, wanted_sets)
        except ResourceExhausted as exc:
            with pytest.raises(ResourceExhausted) as info:
                book.plan(wanted)
            assert info.value.field == exc.field
            continue
        plan = book.plan(wanted)
        assert list(zip(plan.rows.tolist(), plan.experts.tolist(), plan.slots.tolist(), strict=True)) == expected
        before = book.state.copy()
        evicted = book.reserve(plan)
        assert evicted == int(((before == RESIDENT) & (book.state == ABSENT)).sum())
        book.pin(wanted)
        leases.append(wanted)
        done = plan.size if outcome == 0 else 0 if outcome == 1 else plan.size // 2
        if outcome != 3:
            book.commit(plan.rows[:done], plan.experts[:done])
            book.abort(plan.rows[done:], plan.experts[done:])
        if release and leases:
            tick += 1
            book.unpin(leases.pop(0), tick)
        for row in range(3):  # the two directions of the slot map agree, and no slot past capacity is used
            held = np.flatnonzero(book.state[row] != ABSENT)
            assert sorted(book.expert_in_slot[row, book.slot[row, held]].tolist()) == held.tolist()
            assert (book.expert_in_slot[row, int(book.capacity[row]) :] < 0).all()
        assert (book.pins >= 0).all()


def test_a_plan_that_cannot_fit_names_the_layer_and_changes_nothing() -> None:
    book = SlotBook([2, 2], 6, names=[7, 9])
    first = wanted_mask(2, 6, [[0, 1], [0, 1]])
    book.reserve(plan := book.plan(first))
    book.commit(plan.rows, plan.experts)
    book.pin(first)
    state = book.state.copy()
    with pytest.raises(ResourceExhausted) as info:
        book.plan(wanted_mask(2, 6, [[0], [2]]))  # layer 9's slots both hold pinned experts
    assert info.value.field == "layer 9"
    assert (book.state == state).all()
