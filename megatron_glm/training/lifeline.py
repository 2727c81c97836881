"""Tie a training worker's life to its launcher's: when torchrun / the deepspeed launcher dies, so do we.

Launchers start each worker in a session of its own, so killing the launcher (``kill -9``, a scheduler
cancelling the job step) does not reach the workers; orphaned workers would keep training and writing
checkpoints. On Linux the kernel can deliver a signal to a process when its parent dies
(``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread notices the change of parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def launched_by_launcher() -> bool:
    """True under torchrun (``TORCHELASTIC_RUN_ID``) or the deepspeed launcher (``LOCAL_RANK``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


def _watch(parent: int, interval: float, sig: int) -> None:
    while not _orphaned(parent):
        time.sleep(interval)
    os.kill(os.getpid(), sig)


def die_with_parent(sig: int = signal.SIGKILL, poll_interval: float = 1.0, use_prctl: bool = True) -> str:
    """Arrange for this process to receive ``sig`` when its parent process exits; returns the mechanism used.

    ``"prctl"`` on Linux, ``"thread"`` (a daemon thread polling the parent id) elsewhere. If the parent is
    already gone when this is called, the process ends at once: nobody is left to coordinate it.
    """
    parent = os.getppid()
    if parent == 1:
        os.kill(os.getpid(), sig)
    if use_prctl and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
            if _orphaned(parent):  # the parent died between getppid() and prctl()
                os.kill(os.getpid(), sig)
            return "prctl"
    threading.Thread(target=_watch, args=(parent, poll_interval, int(sig)), name="die-with-parent", daemon=True).start()
    return "thread"
