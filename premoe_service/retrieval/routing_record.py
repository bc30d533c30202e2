"""The routing record: what routing was measured with (the off-topic background and the calibrated per-task leads),
kept beside the profiles so that every registry built from them routes the same way with no extra flag."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataCorruption, InvalidArgument
from ..names import check_task_name

#: The record's file in a profile folder (not a task name's `.safetensors`, so no store lists it as a task).
ROUTING_FILE = "routing.json"
FORMAT = 1


@dataclass(frozen=True)
class RoutingRecord:
    """The none-class and the leads a profile folder's routing was calibrated with.

    Attributes:
        background: Off-topic prompts, the none-class a prompt must not resemble more than its best task.
        task_leads: Per task, the lead over the none-class its match needs (`RoutePolicy.task_leads`).
        source: Where the background came from, for people reading the file.
        task_retention: Per task, the mean retention of its pattern on its own prompts, as `premoe bench
            route-quality --save-retention` measured it (exp(NLL all experts - NLL under the pattern) of the full
            model's greedy continuations); the server serves a task that keeps too little with every expert.
    """

    background: tuple[str, ...] = ()
    task_leads: dict[str, float] = field(default_factory=dict)
    source: str = ""
    task_retention: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, text in enumerate(self.background):
            if not isinstance(text, str) or not text.strip():
                raise InvalidArgument("a background prompt is a non-blank string", field=f"background[{i}]")
        for task, lead in self.task_leads.items():
            check_task_name(task, field="task_leads")
            if not isinstance(lead, int | float) or not -100.0 <= lead <= 100.0:
                raise InvalidArgument(f"a lead lies in [-100, 100], got {lead!r}", field=f"task_leads.{task}")
        for task, kept in self.task_retention.items():
            check_task_name(task, field="task_retention")
            if not isinstance(kept, int | float) or not 0.0 <= kept <= 1.5:
                raise InvalidArgument(f"a retention lies in [0, 1.5], got {kept!r}", field=f"task_retention.{task}")

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "source": self.source,
            "task_leads": dict(sorted(self.task_leads.items())),
            "task_retention": dict(sorted(self.task_retention.items())),
            "background": list(self.background),
        }
        return (json.dumps(body, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> RoutingRecord:
        """Read a record; any fault is DataCorruption naming `source` (a file or a Redis key)."""
        try:
            body = json.loads(data.decode("utf-8"))
            if not isinstance(body, dict) or body.get("format") != FORMAT:
                raise ValueError(f"expected an object of format {FORMAT}")
            background, leads = body.get("background", []), body.get("task_leads", {})
            retention = body.get("task_retention", {})
            if not isinstance(background, list) or not isinstance(leads, dict) or not isinstance(retention, dict):
                raise ValueError("'background' is a list, 'task_leads' and 'task_retention' objects")
            return cls(
                tuple(background),
                {str(k): float(v) for k, v in leads.items()},
                str(body.get("source", "")),
                {str(k): float(v) for k, v in retention.items()},
            )
        except (UnicodeDecodeError, ValueError, TypeError, InvalidArgument) as exc:
            raise DataCorruption(f"{source} is not a routing record: {exc}", field=source) from exc

    def save(self, folder: str | Path) -> Path:
        """Write the record into a profile folder (atomically); returns its path."""
        from ..fsutil import atomic_write_bytes

        path = Path(folder) / ROUTING_FILE
        atomic_write_bytes(path, self.to_bytes())
        return path
