"""One run at a time on a local SQLite tracking store: a lock file beside the database
(``mlflow.db.lock``) holding the process id and the command of the run that uses it.

A second ``kedro run`` on the same store fails at once (it does not wait: a run lasts minutes
to hours) with a message naming the other run; without the lock, two first runs at once fail
with SQLite's bare ``OperationalError`` while both create MLflow's tables. A pipeline that opens
no MLflow run (``compare``) reads the store beside a run and lets the lock go.

The lock is the kernel's (``fcntl.flock``), not a marker file: it ends with its process however
that process ends, so the lock of a killed run is simply taken over. The ``filelock`` package
would lock the same way but does not keep the holder's id and command in the file.

Plain Python; no Kedro import. POSIX only (elsewhere the lock is skipped).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_held: dict[str, IO[str]] = {}  # lock path -> the open file that holds it (this process)


class StoreLockedError(RuntimeError):
    """Another run uses the same tracking store; the message names it and the fixes."""


def lock_path(uri: str) -> Path | None:
    """``<database>.lock`` for a local SQLite store; None for a server or a file store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):] + LOCK_SUFFIX)


def store_exists(uri: str) -> bool:
    """Whether the SQLite file is there with something in it (MLflow's tables made)."""
    path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    return path is not None and path.is_file() and path.stat().st_size > 0


def _holder(handle: IO[str]) -> tuple[str, str, str]:
    """(pid, command, since) as the holder wrote them; blanks when unreadable."""
    handle.seek(0)
    lines = handle.read().splitlines() + ["", "", ""]
    return lines[0].strip(), lines[1].strip(), lines[2].strip()


def _locked_message(path: Path, pid: str, command: str, since: str) -> str:
    who = f"PID {pid}" if pid else "another process"
    return (
        f"another run uses the MLflow store beside '{path}': {who}"
        f"{f' ({command})' if command else ''}{f', started {since}' if since else ''}. "
        f"Wait for it to finish, stop it (kill {pid or '<pid>'}), or give this run its own store "
        f"(MLFLOW_TRACKING_URI=sqlite:///other.db) or no tracking (--params tracking.enabled=false)."
    )


def acquire(uri: str, command: str | None = None) -> Path | None:
    """Take the store's lock for this process (again: a no-op), or raise ``StoreLockedError``
    naming the run that holds it. Returns the lock file, None when there is nothing to lock."""
    path = lock_path(uri)
    if path is None or fcntl is None:
        return None
    key = str(path.resolve())
    if key in _held:
        return path  # this process's own earlier session (a notebook, the tests)
    release_all()  # one run per process: a lock of another store left by an earlier session
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # not "w": that would erase the holder's name
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, held_by, since = _holder(handle)
        handle.close()
        raise StoreLockedError(_locked_message(path, pid, held_by, since)) from None
    previous_pid = _holder(handle)[0]
    if previous_pid and previous_pid != str(os.getpid()):
        logger.info("Took over the tracking store's lock %s, left by process %s (gone).", path, previous_pid)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n{command or shlex.join(sys.argv)}\n{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held[key] = handle
    return path


def release_all() -> None:
    """Let go of every lock this process holds. The file stays, emptied: a name left in it
    later means its run ended without letting go (killed)."""
    for key in list(_held):
        handle = _held.pop(key)
        try:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            handle.close()
