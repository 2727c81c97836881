"""One writer per output: an exclusive lock file that names its holder (host, pid, start time).

Preprocessing locks its output's shard folder, training its ``--save`` directory. The lock is ``flock`` on the
file, which the kernel drops when the holder's process ends however it ends; the file also holds a one-line
record of the holder, so a refused run can say who holds it. A record left by a run that was killed (its lock no
longer held, its pid not running on this host) is stale: it is taken over, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["DirLock", "LockBusy", "acquire_lock", "pid_alive"]


class LockBusy(Exception):
    """The lock is held by a live run; ``holder`` describes it."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{holder}; lock file {path}")
        self.path, self.holder = path, holder


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"held by host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {started}"


def _read_record(handle: IO[str]) -> dict | None:
    handle.seek(0)
    text = handle.read().strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {"host": "?", "pid": "?", "started": 0}
    return record if isinstance(record, dict) else None


class DirLock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) clears the record and drops the lock."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path, self.handle = path, handle

    def release(self) -> None:
        if self.handle.closed:
            return
        with contextlib.suppress(OSError):
            self.handle.truncate(0)  # a clean end leaves no record: a record without a lock means a killed run
            self.handle.flush()
        self.handle.close()

    def close(self) -> None:
        self.release()

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def acquire_lock(path: str | os.PathLike[str], log: Callable[[str], None] = print) -> DirLock:
    """Lock ``path`` (created if needed) for this process; :class:`LockBusy` naming the holder if a live run has it.

    ``OSError`` when the file cannot be created.
    """
    path = Path(path)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            handle.close()
            raise
        record = _read_record(handle) or {}
        handle.close()
        raise LockBusy(path, _describe(record)) from None
    record = _read_record(handle)
    if record is not None:
        same_host = record.get("host") == socket.gethostname()
        pid = record.get("pid")
        if same_host and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
            # flock is free but the holder runs: a file system without working locks; trust the record
            handle.close()
            raise LockBusy(path, _describe(record))
        log(f"warning: taking over the stale lock {path} ({_describe(record)}, which is no longer running)")
    handle.seek(0)
    handle.truncate(0)
    handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}) + "\n")
    handle.flush()
    return DirLock(path, handle)
