"""Writing files so that a failure names the file and its cause and leaves nothing behind.

Atomic writes go to a temporary file in the target folder, then are renamed over the target:
an interrupted save never leaves a half-written artifact. The temporary file's name carries the
writer's process id, so the next save to that folder removes what a killed writer left.

Plain Python; no Kedro import.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

logger = logging.getLogger(__name__)

MB = 1024 * 1024
FORMAT_OVERHEAD = 64 * 1024  # zip headers and metadata beyond the arrays' own bytes
# .<target name>.<pid>-<mkstemp's 8 random characters>.tmp (older files: no pid)
_TEMPORARY = re.compile(r"^\..+\.(?:(\d+)-)?[a-z0-9_]{8}\.tmp$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputError(RuntimeError):
    """A file cannot be written; the message names it, the cause and the fix."""


class DiskFullError(OutputError):
    """The disk has no room for a file."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files of saves into ``folder`` whose writer is gone (killed mid-save)."""
    if not folder.is_dir():
        return
    for candidate in folder.iterdir():
        match = _TEMPORARY.match(candidate.name)
        if not match or not candidate.is_file():
            continue
        pid = int(match.group(1)) if match.group(1) else None
        if pid is not None and (pid == os.getpid() or _process_alive(pid)):
            continue
        size = candidate.stat().st_size
        candidate.unlink(missing_ok=True)
        logger.info("Removed %s (%.0f MB), left by an interrupted save.", candidate, size / MB)


def _megabytes(size: int) -> str:
    return f"{size / MB:.2f} MB" if size < 100 * MB else f"{size / MB:.0f} MB"


def _space_message(path: Path, needed: int) -> str:
    free = shutil.disk_usage(path.parent).free
    return (
        f"no space left on device for '{path}': writing it needs about {_megabytes(needed)}, "
        f"the disk has {_megabytes(free)} free. Free some space (or put data/ on a larger disk) "
        f"and rerun; nothing was overwritten."
    )


def _is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception chain (PyTorch wraps it in an 'unexpected pos' error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], size_hint: int = 0) -> None:
    """Write ``path`` through ``write(handle)`` atomically. ``size_hint`` (the bytes of the
    arrays to write) is checked against the free space first, so a full disk mostly fails
    before anything is touched; a disk that fills during the write fails the same way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    size_hint += FORMAT_OVERHEAD if size_hint else 0
    if size_hint and shutil.disk_usage(path.parent).free < size_hint:
        raise DiskFullError(_space_message(path, size_hint))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes it private; a plain file is not
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        if _is_disk_full(error):
            raise DiskFullError(_space_message(path, size_hint)) from error
        raise


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be (re)written, or None."""
    if path.is_file() and not os.access(path, os.W_OK):
        return "the file is read-only or immutable (chmod u+w / chattr -i it, or delete it)"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"'{folder}' is a file where a folder is needed"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder '{folder}' is not writable"
    return None


def check_writable(paths: Iterable[str | os.PathLike]) -> None:
    """Refuse, before a run starts, outputs it could not write at its end."""
    problems = [f"'{path}': {reason}" for path in paths if (reason := _unwritable(Path(path)))]
    if problems:
        raise OutputError(
            f"cannot write the run's outputs: {'; '.join(problems)}. Fix the permissions and rerun."
        )
