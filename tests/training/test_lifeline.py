"""A worker tied to its launcher dies when the launcher is killed (no orphans writing checkpoints)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_glm.training.lifeline import launched_by_launcher

ROOT = Path(__file__).resolve().parents[2]

# The "launcher": starts a worker in a session of its own (as torchrun does), prints its pid, then waits.
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
print(worker.pid, flush=True)
time.sleep(600)
"""
WORKER = """
import sys, time
from megatron_glm.training.lifeline import die_with_parent
print(die_with_parent(use_prctl={use_prctl}, poll_interval=0.2), file=sys.stderr, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is dead


@pytest.mark.parametrize("use_prctl", [True, False], ids=["prctl", "thread"])
def test_worker_dies_with_its_launcher(use_prctl: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, WORKER.format(use_prctl=use_prctl)], stdout=subprocess.PIPE, text=True, env=env
    )
    worker = int(launcher.stdout.readline())
    try:
        time.sleep(3.0)  # the worker imports and arms its guard
        assert _alive(worker), "the worker ended before its launcher was killed"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its killed launcher"
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_launcher_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_launcher()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert launched_by_launcher()
