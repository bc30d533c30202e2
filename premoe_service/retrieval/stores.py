"""Profile stores the registry keeps its profiles in: the interface, in memory, and a local directory."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Hashable
from pathlib import Path
from typing import Protocol

from ..errors import AlreadyExists, DataCorruption, NotFound
from ..names import TASK_NAME, check_task_name
from ..profiler.profile import Profile

log = logging.getLogger(__name__)

PROFILE_SUFFIX = ".safetensors"


class ProfileStore(Protocol):
    """Where profiles live: the source of truth the registry's index is derived from.

    Revisions are opaque tokens that change whenever a task's profile changes; `version()` is a
    cheap token that changes whenever any task changes, so a registry can skip `revisions()`
    (which lists every task) while nothing changed.
    """

    def version(self) -> Hashable:
        """A cheap token that changes on every registration or deletion."""
        ...

    def revisions(self) -> dict[str, Hashable]:
        """Every stored task with its current revision token."""
        ...

    def read(self, name: str) -> tuple[Profile, Hashable]:
        """One profile and its revision; NotFound when absent, DataCorruption when unreadable."""
        ...

    def write(self, profile: Profile, *, replace: bool) -> Hashable:
        """Store a profile atomically and return its revision; AlreadyExists unless `replace`."""
        ...

    def delete(self, name: str) -> None:
        """Remove a profile; NotFound when absent."""
        ...


class MemoryProfileStore:
    """Profiles in this process only: for tests, benchmarks and throw-away registries."""

    def __init__(self) -> None:
        self._profiles: dict[str, tuple[Profile, int]] = {}
        self._version = 0
        self._lock = threading.Lock()

    def version(self) -> Hashable:
        return self._version

    def revisions(self) -> dict[str, Hashable]:
        with self._lock:
            return {name: revision for name, (_, revision) in self._profiles.items()}

    def read(self, name: str) -> tuple[Profile, Hashable]:
        with self._lock:
            if name not in self._profiles:
                raise NotFound(f"no task named {name!r}", field="name")
            return self._profiles[name]

    def write(self, profile: Profile, *, replace: bool) -> Hashable:
        with self._lock:
            if profile.name in self._profiles and not replace:
                raise AlreadyExists(f"task {profile.name!r} exists; pass replace to overwrite it", field="name")
            self._version += 1
            self._profiles[profile.name] = (profile, self._version)
            return self._version

    def delete(self, name: str) -> None:
        with self._lock:
            if self._profiles.pop(name, None) is None:
                raise NotFound(f"no task named {name!r}", field="name")
            self._version += 1


class LocalProfileStore:
    """One `<name>.safetensors` profile file per task in a directory: the embedded default.

    Files are written to a temp file and renamed into place, so a crash leaves the old profile or
    the new one. Revisions are (mtime, size) of each file and the version is the directory's mtime,
    which changes on every rename into it and every deletion. One registry should own a directory;
    replicas that share a registry use `RedisProfileStore`.

    Args:
        directory: The profile directory; created when missing.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._warned: set[str] = set()

    def path(self, name: str) -> Path:
        return self.directory / f"{check_task_name(name)}{PROFILE_SUFFIX}"

    def version(self) -> Hashable:
        return os.stat(self.directory).st_mtime_ns

    def revisions(self) -> dict[str, Hashable]:
        found: dict[str, Hashable] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                # Temp files of unfinished writes start with "." and are never profiles.
                if entry.name.startswith(".") or not entry.name.endswith(PROFILE_SUFFIX):
                    continue
                name = entry.name[: -len(PROFILE_SUFFIX)]
                if not TASK_NAME.fullmatch(name):
                    if entry.name not in self._warned:
                        self._warned.add(entry.name)
                        log.warning("ignoring %s: %r is not a valid task name", entry.path, name)
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue  # deleted while we listed
                found[name] = (stat.st_mtime_ns, stat.st_size)
        return found

    def read(self, name: str) -> tuple[Profile, Hashable]:
        path = self.path(name)
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise NotFound(f"no task named {name!r} (no file {path})", field="name") from exc
        profile = Profile.load(path)
        if profile.name != name:
            raise DataCorruption(f"{path} holds the profile of task {profile.name!r}, not {name!r}", field=str(path))
        return profile, (stat.st_mtime_ns, stat.st_size)

    def write(self, profile: Profile, *, replace: bool) -> Hashable:
        path = self.path(profile.name)
        # Check-then-rename is race-free within one registry (its lock serialises writes); a
        # directory is owned by one registry (see the class docstring).
        if not replace and path.exists():
            raise AlreadyExists(f"task {profile.name!r} exists ({path}); pass replace to overwrite it", field="name")
        profile.save(path)
        stat = path.stat()
        return (stat.st_mtime_ns, stat.st_size)

    def delete(self, name: str) -> None:
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError as exc:
            raise NotFound(f"no task named {name!r} (no file {path})", field="name") from exc
