"""Task names: they become file and key names, so they are checked at every boundary."""

from __future__ import annotations

import re

from .errors import InvalidArgument

TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def check_task_name(name: object, field: str = "name") -> str:
    """Return `name` if it is a valid task name, else raise `InvalidArgument` naming `field`."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        shown = f"{name[:64]!r}... ({len(name)} characters)" if isinstance(name, str) and len(name) > 64 else repr(name)
        raise InvalidArgument(
            f"task name {shown} must match ^[a-z0-9][a-z0-9_.-]{{0,63}}$ (lower-case letters, digits, '_', '.', '-')",
            field=field,
        )
    return name
