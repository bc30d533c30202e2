"""Multi-domain corpus builder for the reference MoE model.

Text domains come from files that exist offline on a stock Debian machine with a Python interpreter:

* ``python`` -- the standard library ``.py`` files of the running interpreter
  (``sysconfig.get_paths()["stdlib"]``, without ``site-packages``).
* ``c``      -- C headers (``*.h``) under ``/usr/include``.
* ``prose``  -- English license and copyright text: ``/usr/share/common-licenses/*`` and
  ``/usr/share/doc/*/copyright``, split into paragraphs and de-duplicated.
* ``shell``  -- shell scripts (``#!/bin/sh``, ``#!/bin/bash``, ``#!/usr/bin/env bash``, ... or ``*.sh``)
  under ``/usr/bin``, ``/usr/sbin``, ``/usr/lib``, ``/usr/share`` and ``/etc``.

Each text domain is split *by file* (by paragraph for prose) with a stable hash of the path (content),
so training, demo and evaluation text come from disjoint files; evaluation/demo chunks that still occur
verbatim in the domain's training text (shared boilerplate) are dropped, and that is asserted.

Generated exact-match tasks live in :mod:`reference.generated`.

Run ``python -m reference.corpus --help``; ``--write-tasks`` writes ``reference/tasks/<task>/{demos,eval}.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from reference import generated
from reference.sources import TEXT_DOMAINS, SourceMissingError

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO_ROOT / "reference" / "tasks"

N_DEMOS = 16
N_EVAL = 250
CHUNK_MIN, CHUNK_MAX = 200, 600


def stable_bucket(key: str, n: int = 100) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") % n


def text_split(key: str) -> str:
    """Split of a text document: 10% eval, 3% demos, 87% train."""
    b = stable_bucket("text:" + key)
    return "eval" if b < 10 else "demos" if b < 13 else "train"


# ---------------------------------------------------------------- splitting and chunking


def load_domain(name: str) -> dict[str, list[tuple[str, str]]]:
    """``{"train"|"demos"|"eval": [(key, text)]}``, de-duplicated by content, in a stable order."""
    docs = TEXT_DOMAINS[name].loader()
    if not docs:
        raise SourceMissingError(f"corpus source for {name!r} has no usable files under {TEXT_DOMAINS[name].paths}")
    seen: set[str] = set()
    split: dict[str, list[tuple[str, str]]] = {"train": [], "demos": [], "eval": []}
    for key, text in docs:
        h = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        split[text_split(f"{name}:{h}")].append((key, text))
    return split


def chunks(text: str, lo: int = CHUNK_MIN, hi: int = CHUNK_MAX) -> list[str]:
    """Cut a document into runs of whole lines (or words, for prose) of about lo..hi characters."""
    pieces = text.splitlines() if "\n" in text.strip() else text.split(" ")
    joiner = "\n" if "\n" in text.strip() else " "
    out, cur = [], []
    size = 0
    for piece in pieces:
        if len(piece) > hi:
            piece = piece[:hi]
        if size + len(piece) > hi and size >= lo:
            out.append(joiner.join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += len(piece) + 1
    if size >= lo:
        out.append(joiner.join(cur))
    good = []
    for c in out:
        c = c.strip("\n")
        if len(c) >= lo and len(set(c.split())) >= 8:
            good.append(c)
    return good


def heldout_records(
    name: str, split_docs: list[tuple[str, str]], n: int, seed: int, train_text: str
) -> list[dict[str, str]]:
    rng = random.Random(f"{seed}:{name}:records:{n}")
    docs = list(split_docs)
    rng.shuffle(docs)
    per_doc_chunks = []
    for _, text in docs:
        cs = chunks(text)
        rng.shuffle(cs)
        per_doc_chunks.append(cs)
    # round-robin over documents: first chunk of every document, then second, ... (diversity first)
    rounds = max(map(len, per_doc_chunks), default=0)
    cands = [cs[i] for i in range(rounds) for cs in per_doc_chunks if i < len(cs)]
    out, seen = [], set()
    for c in cands:
        if c in seen or c in train_text:
            continue
        seen.add(c)
        out.append({"text": c})
        if len(out) == n:
            return out
    raise RuntimeError(f"task {name!r}: only {len(out)} held-out chunks, need {n}")


def train_documents(name: str, docs: list[tuple[str, str]], budget_chars: int, seed: int,
                    max_doc_chars: int = 16_000) -> list[str]:
    """A seeded selection of training documents of the domain, about ``budget_chars`` in all."""
    rng = random.Random(f"{seed}:{name}:train")
    docs = list(docs)
    rng.shuffle(docs)
    out, total = [], 0
    for _, text in docs:
        if name == "prose":
            out.append(text)
        else:
            start = 0
            if len(text) > max_doc_chars:
                start = rng.randrange(0, len(text) - max_doc_chars)
                start = text.rfind("\n", 0, start) + 1
            out.append(text[start:start + max_doc_chars])
        total += len(out[-1])
        if total >= budget_chars:
            break
    if name == "prose":  # paragraphs: group into documents of a few paragraphs
        grouped = ["\n\n".join(out[i:i + 4]) for i in range(0, len(out), 4)]
        return grouped
    return out


# ---------------------------------------------------------------- task files


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build(seed: int, text_budget: dict[str, int], tasks_dir: Path | None = None, log=print) -> dict:
    """Build held-out task files (if ``tasks_dir``) and return the training text per domain.

    Returns ``{"text": {domain: [documents]}, "tasks": {task: {"demos": [...], "eval": [...]}}}``.
    """
    text_train: dict[str, list[str]] = {}
    tasks: dict[str, dict[str, list[dict[str, str]]]] = {}
    for name in TEXT_DOMAINS:
        split = load_domain(name)
        all_train = "\n".join(t for _, t in split["train"])
        demos = heldout_records(name, split["demos"], N_DEMOS, seed, all_train)
        evals = heldout_records(name, split["eval"], N_EVAL, seed, all_train)
        assert not {r["text"] for r in demos} & {r["text"] for r in evals}
        text_train[name] = train_documents(name, split["train"], text_budget[name], seed)
        tasks[name] = {"demos": demos, "eval": evals}
        log(f"[corpus] {name}: {len(split['train'])} train / {len(split['demos'])} demo / {len(split['eval'])} eval "
            f"documents; training text {sum(map(len, text_train[name])) / 1e6:.2f} MB in {len(text_train[name])} docs")
    for name in generated.GENERATED_TASKS:
        demos = generated.sample(name, "demos", N_DEMOS, seed)
        evals = generated.sample(name, "eval", N_EVAL, seed)
        assert all(generated.split_of(r["prompt"]) == "demos" for r in demos)
        assert all(generated.split_of(r["prompt"]) == "eval" for r in evals)
        assert not {r["prompt"] for r in demos} & {r["prompt"] for r in evals}
        tasks[name] = {"demos": demos, "eval": evals}
    if tasks_dir is not None:
        for name, recs in tasks.items():
            write_jsonl(tasks_dir / name / "demos.jsonl", recs["demos"])
            write_jsonl(tasks_dir / name / "eval.jsonl", recs["eval"])
        log(f"[corpus] wrote {len(tasks)} tasks under {tasks_dir}")
    return {"text": text_train, "tasks": tasks}


DEFAULT_TEXT_BUDGET = {"python": 6_000_000, "c": 6_000_000, "prose": 3_000_000, "shell": 2_000_000}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--write-tasks", action="store_true", help=f"write task files under {TASKS_DIR}")
    args = ap.parse_args(argv)
    build(args.seed, DEFAULT_TEXT_BUDGET, TASKS_DIR if args.write_tasks else None)


if __name__ == "__main__":
    main()
