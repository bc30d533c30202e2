"""The project's one error hierarchy; each error names the field, layer or item at fault."""

from __future__ import annotations


class PreMoeError(Exception):
    """Base class of every error the project raises on purpose.

    Args:
        message: What went wrong and, where it helps, what to do about it.
        field: The input field, option, layer or key at fault, when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field and not self.message.startswith(self.field):
            return f"{self.field}: {self.message}"
        return self.message


class InvalidArgument(PreMoeError):
    """Bad input from a caller: a request field, a CLI option, a file's content."""


class PatternError(InvalidArgument):
    """A pattern that the model cannot run; `field` names the layer (e.g. ``layer 3``)."""


class UnsupportedModel(InvalidArgument):
    """A checkpoint or config of a family (or variant) that no adapter covers."""


class NotFound(PreMoeError):
    """A named thing (task, store, file) that does not exist."""


class AlreadyExists(PreMoeError):
    """A named thing that exists already and may not be replaced silently."""


class Unauthenticated(PreMoeError):
    """A call that needs credentials (API key or admin token) came without them, or with a wrong API key."""


class PermissionDenied(PreMoeError):
    """A call whose credentials do not allow it (an admin call without the admin token)."""


class FailedPrecondition(PreMoeError):
    """The system is not in a state to do this (e.g. a profile for another model fingerprint)."""


class ResourceExhausted(PreMoeError):
    """A budget, slot capacity or queue is full."""


class Unavailable(PreMoeError):
    """A dependency or the service itself cannot serve right now (shutting down, backend down)."""


class DeadlineExceeded(PreMoeError):
    """The caller's deadline passed before the work could be done."""


class DataCorruption(PreMoeError):
    """Stored bytes that fail their checksum or do not parse; `field` names the item."""
