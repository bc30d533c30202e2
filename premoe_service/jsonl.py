"""JSONL input files (demos, route examples, labelled queries): one JSON value per non-blank line, errors that name
the file and the line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import InvalidArgument, NotFound


def read_jsonl(path: str | Path, what: str, where: Callable[[Path, int], str]) -> Iterator[tuple[object, str]]:
    """Each non-blank line's JSON value with `where(path, line number)`, the name errors about it give.

    Raises:
        NotFound: No file at `path` (the error's field is `what`).
        InvalidArgument: The file is not UTF-8 text, or a line is not JSON.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise NotFound(f"no {what} file at {path}", field=what) from exc
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path} is not UTF-8 text: {exc}", field=str(path)) from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        place = where(path, number)
        try:
            yield json.loads(line), place
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"line {number} is not JSON ({exc.msg})", field=place) from exc
