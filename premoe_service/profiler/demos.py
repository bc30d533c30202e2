"""Task demonstrations: JSONL parsing with errors that name the line, and the demo hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from ..jsonl import read_jsonl


@dataclass(frozen=True)
class Demo:
    """One demonstration. Both the prompt and the answer count as the task's tokens."""

    prompt: str
    answer: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.answer

    def to_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer} if self.answer else {"text": self.prompt}


def parse_demo(record: object, where: str) -> Demo:
    """A demo from `{"text": ...}` or `{"prompt": ..., "answer": ...}`; `where` names it in errors."""
    if isinstance(record, str):
        record = {"text": record}
    if not isinstance(record, dict):
        raise InvalidArgument('a demo is a JSON object: {"text": ...} or {"prompt": ..., "answer": ...}', field=where)
    keys = set(record)
    if keys == {"text"}:
        prompt, answer = record["text"], ""
    elif keys in ({"prompt", "answer"}, {"prompt"}):
        prompt, answer = record["prompt"], record.get("answer", "")
    else:
        raise InvalidArgument(
            f'unexpected keys {sorted(keys)}: use {{"text": ...}} or {{"prompt": ..., "answer": ...}}', field=where
        )
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise InvalidArgument("demo fields must be strings", field=where)
    if not (prompt + answer).strip():
        raise InvalidArgument("demo is empty", field=where)
    return Demo(prompt, answer)


def load_demos(path: str | Path) -> list[Demo]:
    """Read a JSONL demo file; blank lines are skipped, every other line must be a demo."""
    demos = [parse_demo(record, where) for record, where in read_jsonl(path, "demos", _line_of)]
    if not demos:
        raise InvalidArgument(f"{path} holds no demos", field="demos")
    return demos


def load_examples(path: str | Path) -> list[str]:
    """Read a JSONL file of route examples: one {"text": ...} (or {"prompt": ...}, {"query": ...}) per line."""
    examples = []
    for record, where in read_jsonl(path, "examples", _line_of):
        keys = [k for k in ("text", "prompt", "query") if isinstance(record, dict) and k in record]
        text = record[keys[0]] if keys and isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument('needs a non-empty "text" (or "prompt", "query") string', field=where)
        examples.append(text)
    return examples


def _line_of(path: Path, number: int) -> str:
    return f"{path.name} line {number}"


class CheckedDemos(list[Demo]):
    """Demos that passed `check_demos`: a later `check_demos` takes them as they are (a door checks them once)."""


class CheckedExamples(list[str]):
    """Route examples that passed `check_examples`: a later `check_examples` takes them as they are."""


def check_examples(examples: Iterable[object]) -> CheckedExamples:
    """Route examples given in a request; errors name the index."""
    if isinstance(examples, CheckedExamples):
        return examples
    checked = CheckedExamples()
    for i, example in enumerate(examples):
        if not isinstance(example, str) or not example.strip():
            raise InvalidArgument("an example is a non-empty string", field=f"examples[{i}]")
        checked.append(example)
    return checked


def check_demos(demos: Iterable[object]) -> CheckedDemos:
    """Demos given in a request (strings or records); errors name the index."""
    if isinstance(demos, CheckedDemos):
        return demos
    parsed = CheckedDemos(d if isinstance(d, Demo) else parse_demo(d, f"demos[{i}]") for i, d in enumerate(demos))
    if not parsed:
        raise InvalidArgument("at least one demo is needed", field="demos")
    for i, demo in enumerate(parsed):
        if not demo.text.strip():
            raise InvalidArgument("demo is empty", field=f"demos[{i}]")
    return parsed


def demo_hash(demos: Iterable[Demo]) -> str:
    digest = hashlib.sha256()
    for demo in demos:
        digest.update(json.dumps(demo.to_json(), sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()
