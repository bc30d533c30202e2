"""Profile stores the registry keeps its profiles in: the interface, in memory, and a local directory (the
record, with tombstones for deletions); which one a deployment opens."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from ...errors import AlreadyExists, DataCorruption, NotFound
from ...fsutil import atomic_write_bytes, atomic_writer, disk_error, ensure_folder, remove_stale_temps
from ...names import TASK_NAME, check_task_name
from ...profiler.profile import Profile
from ..routing_record import ROUTING_FILE

log = logging.getLogger(__name__)

PROFILE_SUFFIX = ".safetensors"
TOMBSTONE_SUFFIX = ".deleted"


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

    def routing(self) -> bytes | None:
        """The routing record's bytes (`routing_record.RoutingRecord`), or None when the store holds none."""
        ...

    def write_routing(self, data: bytes) -> None:
        """Store the routing record's bytes (a change of `version()`)."""
        ...


class MemoryProfileStore:
    """Profiles in this process only: for tests, benchmarks and throw-away registries."""

    def __init__(self) -> None:
        self._profiles: dict[str, tuple[Profile, int]] = {}
        self._routing: bytes | None = None
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

    def routing(self) -> bytes | None:
        return self._routing

    def write_routing(self, data: bytes) -> None:
        with self._lock:
            self._routing = data
            self._version += 1


class LocalProfileStore:
    """One `<name>.safetensors` profile file per task in a directory: the registry's record.

    The folder also holds the routing record (`routing.json`: the none-class background and calibrated leads),
    so that whoever routes with these profiles routes as they were measured.

    Files are written to a locked temp file and renamed into place, so a crash leaves the old profile or the
    new one; temp files of writers that were killed are removed when the store opens. A deletion leaves a
    tombstone, `<name>.deleted`, before the profile file goes: a tombstone wins over a profile file of the same
    name, so nothing re-imports a deleted task (into a Redis that lost its data, or from a copy of the file),
    and a registration of the name removes it once its profile is in place.

    Revisions are (mtime, size) of each file and the version is the directory's mtime, which changes on every
    rename into it and every deletion. Several registries may share a directory (e.g. replicas on one Redis
    with one profiles volume); without Redis, concurrent registrations of one name are last-writer-wins.

    Args:
        directory: The profile directory; created when missing.

    Raises:
        Unavailable: The directory cannot be created (its parent is a file, a read-only disk).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        ensure_folder(self.directory)
        remove_stale_temps(self.directory)
        self._warned: set[str] = set()

    def path(self, name: str) -> Path:
        return self.directory / f"{check_task_name(name)}{PROFILE_SUFFIX}"

    def tombstone(self, name: str) -> Path:
        return self.directory / f"{check_task_name(name)}{TOMBSTONE_SUFFIX}"

    def version(self) -> Hashable:
        try:
            return os.stat(self.directory).st_mtime_ns
        except OSError as exc:
            raise disk_error(exc, self.directory, "read the profile folder") from exc

    def revisions(self) -> dict[str, Hashable]:
        profiles, tombstones = self._scan()
        return {name: revision for name, revision in profiles.items() if name not in tombstones}

    def tombstones(self) -> dict[str, str]:
        """The tasks deleted here (and not registered again since), each with the SHA-256 of the profile file
        it deleted ("" when unknown)."""
        found = {}
        for name in sorted(self._scan()[1]):
            try:
                record = json.loads(self.tombstone(name).read_bytes())
                found[name] = str(record.get("sha256", "")) if isinstance(record, dict) else ""
            except FileNotFoundError:
                continue  # registered again since we listed
            except (OSError, ValueError):
                found[name] = ""  # a damaged tombstone still marks the task deleted
        return found

    def exists(self, name: str) -> bool:
        """Whether the task has a profile file and no tombstone."""
        return self.path(name).exists() and not self.tombstone(name).exists()

    def read_bytes(self, name: str) -> bytes:
        """The bytes of a task's profile file; NotFound when absent or deleted, DataCorruption when unreadable."""
        path = self.path(name)
        if self.tombstone(name).exists():
            raise NotFound(f"task {name!r} was deleted ({self.tombstone(name)})", field="name")
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"no task named {name!r} (no file {path})", field="name") from exc
        except OSError as exc:
            raise DataCorruption(f"cannot read {path}: {exc.strerror or exc}", field=str(path)) from exc

    def read(self, name: str) -> tuple[Profile, Hashable]:
        path = self.path(name)
        try:
            stat = path.stat()  # before the bytes: a file replaced in between is read again at the next change
        except FileNotFoundError as exc:
            raise NotFound(f"no task named {name!r} (no file {path})", field="name") from exc
        except OSError as exc:
            raise DataCorruption(f"cannot read {path}: {exc.strerror or exc}", field=str(path)) from exc
        data = self.read_bytes(name)
        profile = Profile.from_bytes(data, source=str(path))
        if profile.name != name:
            raise DataCorruption(f"{path} holds the profile of task {profile.name!r}, not {name!r}", field=str(path))
        return profile, (stat.st_mtime_ns, stat.st_size)

    @contextmanager
    def writing(self, name: str, data: bytes, *, replace: bool) -> Iterator[None]:
        """Write a profile file in two steps: its bytes go to a temp file (flushed and synced) before the body
        runs, and it replaces the task's file only when the body ends without error. A caller that must also
        write elsewhere (Redis) does so in the body: nothing is left on disk if that fails.

        Raises:
            AlreadyExists: The task exists and `replace` is False.
            ResourceExhausted: The disk is full; nothing was written.
            Unavailable: The folder cannot be written; nothing was written.
        """
        path = self.path(name)
        if not replace and self.exists(name):
            raise AlreadyExists(f"task {name!r} exists ({path}); pass replace to overwrite it", field="name")
        with atomic_writer(path) as handle:
            handle.write(data)
            handle.flush()  # a full disk shows here, before the body, not at the rename
            os.fsync(handle.fileno())
            yield
        self.unbury(name)

    def write(self, profile: Profile, *, replace: bool) -> Hashable:
        with self.writing(profile.name, profile.to_bytes(), replace=replace):
            pass
        stat = self.path(profile.name).stat()
        return (stat.st_mtime_ns, stat.st_size)

    def bury(self, name: str, digest: str = "") -> bool:
        """Record the task's deletion (atomically); returns whether there was no tombstone before.

        Args:
            name: The task.
            digest: SHA-256 of the profile file deleted, so that a copy of exactly that profile (in a Redis
                snapshot from before the deletion) can be told from a later registration of the name.

        Raises:
            ResourceExhausted, Unavailable: The tombstone cannot be written.
        """
        tombstone = self.tombstone(name)
        if tombstone.exists():
            return False
        now = datetime.now(UTC).isoformat(timespec="seconds")
        record = {"task": name, "deleted": now, "sha256": digest}
        atomic_write_bytes(tombstone, (json.dumps(record) + "\n").encode())
        return True

    def unbury(self, name: str) -> None:
        """Remove the task's tombstone, if any (a registration of the name is complete)."""
        try:
            self.tombstone(name).unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot remove the tombstone %s: %s (the task counts as deleted)", self.tombstone(name), exc)

    def remove_profile(self, name: str) -> None:
        """Remove the task's profile file after its tombstone is written (a failure only leaves a buried file)."""
        try:
            self.path(name).unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot remove %s: %s (its tombstone keeps the task deleted)", self.path(name), exc)

    def routing(self) -> bytes | None:
        path = self.directory / ROUTING_FILE
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # the folder cannot be read (a file in its place, no permission): not bad bytes
            raise disk_error(exc, path, "read") from exc

    def write_routing(self, data: bytes) -> None:
        atomic_write_bytes(self.directory / ROUTING_FILE, data)  # the rename moves the folder's mtime: the version

    def delete(self, name: str) -> None:
        if not self.exists(name):
            raise NotFound(f"no task named {name!r} (no file {self.path(name)})", field="name")
        self.bury(name, hashlib.sha256(self.read_bytes(name)).hexdigest())
        self.remove_profile(name)

    def _scan(self) -> tuple[dict[str, Hashable], set[str]]:
        profiles: dict[str, Hashable] = {}
        tombstones: set[str] = set()
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    # Temp files of unfinished writes start with "." and are never profiles.
                    if entry.name.startswith("."):
                        continue
                    if entry.name.endswith(TOMBSTONE_SUFFIX):
                        name = entry.name[: -len(TOMBSTONE_SUFFIX)]
                        if TASK_NAME.fullmatch(name):
                            tombstones.add(name)
                        continue
                    if not entry.name.endswith(PROFILE_SUFFIX):
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
                    profiles[name] = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            raise disk_error(exc, self.directory, "list the profile folder") from exc
        return profiles, tombstones
