"""Atomic file writes (a locked temp file in the same folder, fsync, rename, fsync of the folder), the cleaning
of temp files that killed writers left behind, and the project errors a failing disk maps to."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import PreMoeError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
# `.<final name>.<8 random characters from mkstemp>.tmp`: what `atomic_writer` creates, and nothing else.
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# Errors of a full disk; everything else that stops a write is an unwritable path (read-only, not a folder...).
_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
# Errors only a write can raise: an OSError with one of these from the writer's body is about the temp file.
_WRITE_ERRORS = _FULL | {errno.EROFS}


def disk_error(exc: OSError, path: str | Path, doing: str = "write") -> PreMoeError:
    """The project error for a disk that refused a write: ResourceExhausted when it is full (ENOSPC, EFBIG,
    EDQUOT; gRPC's RESOURCE_EXHAUSTED names "the entire file system is out of space"), Unavailable otherwise
    (read-only, a parent that is not a folder, no permission). The error names the path."""
    reason = os.strerror(exc.errno) if exc.errno is not None else str(exc)
    if exc.errno in _FULL:
        message = f"cannot {doing} {path}: {reason} (the disk or a file size limit is full)"
        return ResourceExhausted(message, field=str(path))
    return Unavailable(f"cannot {doing} {path}: {reason}", field=str(path))


def ensure_folder(directory: str | Path, path: str | Path | None = None) -> None:
    """Create `directory` (and its parents) when missing.

    Raises:
        Unavailable: It cannot be created (a file in its place or above it, a read-only disk), naming `path`
            (what was to be written there) or else the folder.
        ResourceExhausted: The disk is full.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # mkdir's answer when the folder, or one above it, is a file
        raise disk_error(NotADirectoryError(errno.ENOTDIR, "Not a directory"), path or directory) from exc
    except OSError as exc:
        raise disk_error(exc, path or directory, "write" if path else "create") from exc


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temp file beside `path`; on clean exit it replaces `path` atomically, else it is removed.

    The temp file is locked (`flock`) from its creation to its rename, so `remove_stale_temps` can tell the
    leftovers of a killed writer (no lock: the kernel dropped it) from a write in progress in another process.

    Raises:
        ResourceExhausted: The disk is full (or the file size limit is reached); nothing is left behind.
        Unavailable: The path cannot be written (read-only, its parent is not a folder, ...).
    """
    path = Path(path)
    ensure_folder(path.parent, path)
    try:
        fd, tmp = _locked_temp(path)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    handle = os.fdopen(fd, "wb")
    try:
        try:
            yield handle
        except OSError as exc:
            if exc.errno in _WRITE_ERRORS:
                raise disk_error(exc, path) from exc
            raise
        try:
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp, path)  # while still locked: the cleaner of another process never takes it
        except OSError as exc:
            raise disk_error(exc, path) from exc
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        with contextlib.suppress(OSError):  # a failed flush of a discarded temp file must not hide the cause
            handle.close()  # drops the lock


def _locked_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside `path`, created and locked by this process."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a cleaner is removing it
        if os.fstat(fd).st_nlink > 0:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should read like any written file
            return fd, tmp
        os.close(fd)  # a cleaner took it between mkstemp and flock: make another


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one."""
    with atomic_writer(path) as handle:
        handle.write(data)


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of `atomic_writer`'s temp files."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temp files of writers that died before their rename (SIGKILL, power loss); returns them.

    A temp file that another process is still writing holds its lock and is kept, so this is safe on a folder
    that several servers share. Errors are logged, never raised: cleaning is housekeeping.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed  # a missing or unreadable folder has nothing of ours to clean
    for entry in entries:
        if not is_temp_name(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer holds it
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove the stale temp file %s: %s", entry.path, exc)
        finally:
            os.close(fd)
    if removed:
        log.warning("removed %d temp file(s) of interrupted writes in %s", len(removed), directory)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OpenFiles:
    """Read-only file descriptors opened once per key and kept until `close`: the store's readers `pread` from
    them on many threads at once (a descriptor is shared; `pread` takes its own offset)."""

    def __init__(self) -> None:
        self._fds: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def fd(self, key: Hashable, path: Callable[[], Path]) -> int:
        """The descriptor of `key`, opening `path()` the first time it is asked for."""
        fd = self._fds.get(key)
        if fd is None:
            with self._lock:
                fd = self._fds.get(key)
                if fd is None:
                    fd = self._fds[key] = os.open(path(), os.O_RDONLY)
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
