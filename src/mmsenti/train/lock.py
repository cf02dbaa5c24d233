"""One writer per run directory: an OS-level lock held for the whole run.

The lock is ``fcntl.flock`` on ``RUN_DIR/run.lock``, which records the holder's PID, host and start time. A second
process that tries to write into the same run directory is refused with a one-line :class:`RunDirLocked` naming
the holder. The kernel releases the lock when its process ends, however it ends (``kill -9`` included), so a
killed run's lock is taken over by the next ``--resume`` without any stale-lock guessing; the file's old content
only says who held it last.

The file is never deleted (deleting a lock file races with a process that has just opened it); a clean release
empties it. Locks are advisory and local to what the kernel sees: on a network file system they hold between
machines only where the file system supports ``flock`` (NFSv4, Lustre with ``-o flock``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmsenti.errors import RunDirLocked

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (no holder recorded yet)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            + (f", since {holder['started']}" if holder.get("started") else ""))


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


class RunDirLock:
    """An exclusive, non-blocking lock on ``run_dir`` (see the module docstring); also a context manager."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Take the lock or raise :class:`RunDirLocked` naming the holder; creates ``run_dir`` if needed."""
        if self._fd is not None:
            return self
        if fcntl is None:
            log.warning("%s: no fcntl on this platform; the run directory is not locked against a second writer",
                        self.run_dir)
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's record must survive
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLocked(f"{self.run_dir} is in use by another mmsenti run ({_describe(holder)}); wait for it "
                               f"to finish, stop it, or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        previous = _read_holder(fd)
        if previous:  # a clean release empties the file: this one's holder ended without releasing (killed)
            log.info("%s: taking over the lock of a run that ended without releasing it (%s)", self.run_dir,
                     _describe(previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path) -> Iterator[RunDirLock]:
    """``with hold_run_dir(out):`` the block runs as the only writer of ``out``."""
    with RunDirLock(run_dir) as lock:
        yield lock


def check_run_dir_free(run_dir: str | Path) -> None:
    """Raise :class:`RunDirLocked` if a live process holds ``run_dir`` (a probe: changes nothing)."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with a holder's exclusive lock only
    except BlockingIOError:
        raise RunDirLocked(f"{run_dir} is in use by another mmsenti run ({_describe(_read_holder(fd))})") from None
    finally:
        os.close(fd)
