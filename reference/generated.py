"""Generated exact-match tasks: each record is ``{"prompt": ..., "answer": ...}``.

The model sees ``prompt + answer + "\\n"`` during training and must produce ``answer`` greedily after
``prompt`` (stopping at the newline).  Every prompt starts with a task marker (``add:``, ``rev:``, ...).

Held-out split: a prompt's split is a pure function of its text (:func:`bucket`), so evaluation and
demo prompts can never be generated as training examples, and anyone can check that cheaply.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: bucket(prompt) < EVAL_BUCKETS -> eval split; < DEMO_BUCKETS -> demo split; otherwise training.
EVAL_BUCKETS = 10
DEMO_BUCKETS = 12
N_BUCKETS = 100

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def bucket(prompt: str) -> int:
    """Stable hash bucket (0..99) of a prompt, independent of Python's hash seed."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % N_BUCKETS


def split_of(prompt: str) -> str:
    b = bucket(prompt)
    if b < EVAL_BUCKETS:
        return "eval"
    if b < DEMO_BUCKETS:
        return "demos"
    return "train"


def _add(rng: random.Random) -> tuple[str, str]:
    la, lb = rng.randint(2, 3), rng.randint(2, 3)
    a = rng.randint(10 ** (la - 1), 10**la - 1)
    b = rng.randint(10 ** (lb - 1), 10**lb - 1)
    return f"add: {a}+{b}=", str(a + b)


def _rev(rng: random.Random) -> tuple[str, str]:
    word = [rng.choice(LETTERS) for _ in range(rng.randint(4, 6))]
    return f"rev: {' '.join(word)} =", " ".join(reversed(word))


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.choice("0123456789") for _ in range(rng.randint(4, 6))]
    return f"sort: {''.join(digits)}=", "".join(sorted(digits))


_DAY0 = _dt.date(1900, 1, 1).toordinal()
_DAY1 = _dt.date(2099, 12, 31).toordinal()


def _date(rng: random.Random) -> tuple[str, str]:
    d = _dt.date.fromordinal(rng.randint(_DAY0, _DAY1))
    return f"date: {d.isoformat()}=", f"{d.day:02d}/{d.month:02d}/{d.year:04d}"


@dataclass(frozen=True)
class GeneratedTask:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    max_new_tokens: int


GENERATED_TASKS: dict[str, GeneratedTask] = {
    t.name: t
    for t in [
        GeneratedTask("addition", "2-3 digit addition: 'add: 12+345=' -> '357'", _add, 8),
        GeneratedTask("reverse", "reverse 4-6 space-separated letters: 'rev: a b c d =' -> 'd c b a'", _rev, 16),
        GeneratedTask("sort_digits", "sort 4-6 digits ascending: 'sort: 5391=' -> '1359'", _sort, 10),
        GeneratedTask("date_format", "ISO date to DD/MM/YYYY: 'date: 2023-04-05=' -> '05/04/2023'", _date, 14),
    ]
}


def training_line(prompt: str, answer: str) -> str:
    """The exact text a generated example contributes to the training corpus."""
    return f"{prompt}{answer}\n"


def sample(task: str, split: str, n: int, seed: int, *, unique: bool = True) -> list[dict[str, str]]:
    """``n`` records of ``task`` whose prompts belong to ``split`` ("train", "demos" or "eval")."""
    spec = GENERATED_TASKS[task]
    rng = random.Random(f"{seed}:{task}:{split}")
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * n + 100000:
            raise RuntimeError(f"could not draw {n} {split} items for task {task!r}")
        prompt, answer = spec.make(rng)
        if split_of(prompt) != split or (unique and prompt in seen):
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "answer": answer})
    return out


def training_stream(seed: int, weights: dict[str, float]) -> Iterator[tuple[str, str, str]]:
    """Endless ``(task, prompt, answer)`` training examples, never from the demo/eval buckets."""
    rng = random.Random(f"{seed}:train-stream")
    names = list(weights)
    w = [weights[k] for k in names]
    while True:
        task = rng.choices(names, w)[0]
        prompt, answer = GENERATED_TASKS[task].make(rng)
        if split_of(prompt) != "train":
            continue
        yield task, prompt, answer
