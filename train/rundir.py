"""Directories that lora-jax owns: the ownership mark, the run lock, early write checks.

A command that writes a directory (``lora-jax train``'s ``output_dir``, ``merge --out``,
``import-peft --out``, an experiment's ``output_dir``) first :func:`claim` s it:

* a directory that does not exist, or is empty, is created and marked: a small JSON file
  :data:`MARK_FILE` ``{"kind": "run", "created": "<UTC ISO time>"}``;
* a directory that carries the mark of the same kind is ours: it is reused (a resume);
* anything else (a non-empty directory without the mark, or with another kind's mark)
  is refused with :class:`DirectoryError`, and nothing in it is touched.

Only a marked directory is ever deleted or overwritten by a command (:func:`owned`).

:class:`RunLock` makes a run directory single-writer: a lock file :data:`LOCK_FILE` with
the holder's pid and host, created atomically (``O_EXCL``). A lock left by a process that
is gone (same host, pid not running) is stale and taken over; a live holder, or one on
another host, is refused with the holder named.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from train.errors import UserError

MARK_FILE = ".lora-jax.json"
LOCK_FILE = ".lora-jax.lock"
_MARK_TEMPORARY = MARK_FILE + ".tmp"


class DirectoryError(UserError, ValueError):
    """A directory a command may not write into; the message names it and the fix."""


class DiskFullError(UserError, OSError):
    """The disk filled up mid-command; the message says what is kept and how to go on."""


def read_mark(directory: str | Path) -> dict[str, Any] | None:
    """The ownership mark of ``directory``, or None if it has none (or an unreadable one)."""
    file = Path(directory) / MARK_FILE
    try:
        mark = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and "kind" in mark else None


def owned(directory: str | Path, kind: str | None = None) -> bool:
    """Does ``directory`` carry lora-jax's mark (of ``kind``, when given)?"""
    mark = read_mark(directory)
    return mark is not None and (kind is None or mark["kind"] == kind)


def check_writable(directory: str | Path, what: str = "output directory") -> Path:
    """Raise DirectoryError unless ``directory`` can be created or written; creates nothing.

    Catches a path that is a file (or has a file as an ancestor) and a read-only place,
    before any slow work starts.
    """
    path = Path(directory).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DirectoryError(
            f"{what} {path} cannot be created: {probe} is a file, not a "
            f"directory; choose another path"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DirectoryError(
            f"{what} {path} is not writable ({probe} does not allow writing "
            f"for this user); choose a writable path"
        )
    return path


def claim(directory: str | Path, kind: str, *, what: str = "output directory") -> Path:
    """Create or reuse ``directory`` as a lora-jax ``kind`` directory; return its path.

    Raises DirectoryError for a non-empty directory that is not a marked ``kind`` directory.
    """
    path = check_writable(directory, what)
    if path.exists():
        mark = read_mark(path)
        if mark is not None and mark["kind"] == kind:
            return path
        if mark is not None:
            raise DirectoryError(
                f"{what} {path} is a lora-jax {mark['kind']!r} directory, not "
                f"a {str(kind)!r} one; choose a new or empty directory"
            )
        if any(child.name != _MARK_TEMPORARY for child in path.iterdir()):
            raise DirectoryError(
                f"{what} {path} is not empty and was not created by lora-jax "
                f"(no {MARK_FILE} in it); nothing was changed. Choose a new or "
                f"empty directory (if it is a lora-jax {kind} directory from "
                f'before these marks, adopt it: echo \'{{"kind": "{kind}"}}\' '
                f"> {path / MARK_FILE})"
            )
    path.mkdir(parents=True, exist_ok=True)
    mark = {
        "kind": str(kind),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    temporary = path / _MARK_TEMPORARY  # then a rename: a kill never leaves half a mark
    temporary.write_text(json.dumps(mark) + "\n")
    os.replace(temporary, path / MARK_FILE)
    return path


def clear(directory: str | Path, kind: str) -> None:
    """Delete everything in a marked ``kind`` directory but its mark and lock (``--fresh``).

    Raises DirectoryError, deleting nothing, unless ``directory`` carries the mark.
    """
    path = Path(directory)
    if not owned(path, kind):
        raise DirectoryError(
            f"{path} is not a lora-jax {kind} directory (no {MARK_FILE} of "
            f"kind {kind!r}); it is not deleted. Remove it yourself if you "
            f"are sure, or choose another directory"
        )
    for child in path.iterdir():
        if child.name in (MARK_FILE, LOCK_FILE):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory for the life of a ``with`` block.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with RunLock(d):
    ...     (d / LOCK_FILE).exists()
    True
    >>> (d / LOCK_FILE).exists()
    False
    """

    def __init__(self, directory: str | Path):
        self.file = Path(directory) / LOCK_FILE
        self.holder = {"pid": os.getpid(), "host": socket.gethostname()}
        self.took_over: dict[str, Any] | None = None  # the stale holder replaced, if any

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read()
                if held is None or not self._stale(held):
                    raise DirectoryError(self._busy_message(held)) from None
                self.took_over = held
                self.file.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.holder) + "\n")
            return self
        raise DirectoryError(self._busy_message(self._read()))

    def __exit__(self, *exc: object) -> None:
        if self._read() == self.holder:
            self.file.unlink(missing_ok=True)

    def _read(self) -> dict[str, Any] | None:
        try:
            held = json.loads(self.file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return held if isinstance(held, dict) else {}

    def _stale(self, held: dict[str, Any]) -> bool:
        """A lock whose holder is known to be gone: same host, pid no longer running."""
        if held.get("host") != self.holder["host"] or not isinstance(held.get("pid"), int):
            return False
        return not _pid_alive(held["pid"])

    def _busy_message(self, held: dict[str, Any] | None) -> str:
        who = f"process {held.get('pid')} on host {held.get('host')}" if held else "another process"
        return (
            f"run directory {self.file.parent} is in use by {who} (lock file {self.file}); "
            f"wait for that run to end, or use another output_dir. If no such process is "
            f"running, delete {self.file}"
        )


def is_disk_full(error: BaseException) -> bool:
    """Is ``error``, or an error it was raised from, out of disk space? (an OSError with
    ENOSPC/EDQUOT, or a wrapped one whose text says so, as orbax and tensorstore raise)"""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if os.strerror(errno.ENOSPC) in str(seen):  # "No space left on device"
            return True
        seen = seen.__cause__ or seen.__context__
    return False
