"""Flags for a benchmark's `python -m` entry, one per field of its options dataclass (the CLI verbs wrap `run`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def parse_options(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """`cls` built from `--field-name VALUE` flags; booleans are switches, unset fields keep their defaults."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        default: Any = field.default
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default, metavar=field.name.upper())
    return cls(**vars(parser.parse_args(argv)))
