"""Error exits are deterministic (issue 27, defect 7): with a gloo process group and a DataLoader worker alive,
every run prints its one line and exits 2, never ``terminate called without an active exception`` (rc 134)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHILD = [sys.executable, str(Path(__file__).with_name("error_exit_child.py"))]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CHILD, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_twenty_error_exits_are_all_rc_2_without_terminate() -> None:
    results = []
    for batch in range(5):  # 20 runs, 4 at a time; worker-side and main-side failures alternate
        procs = [_start("--where", "worker" if (batch + k) % 2 else "main") for k in range(4)]
        results += [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for rc, stderr in results:
        assert rc == 2 and "terminate called" not in stderr and "Traceback" not in stderr, (rc, stderr[-2000:])
        assert stderr.strip().splitlines()[-1].startswith("error: staged.bin: "), stderr[-2000:]


def test_a_hung_shutdown_still_exits_with_the_error_code() -> None:
    started = time.monotonic()
    proc = _start("--where", "main", "--hang-shutdown")
    rc, stderr = proc.wait(timeout=120), proc.stderr.read()
    assert rc == 2 and stderr.strip().splitlines()[-1] == "error: staged.bin: failed in the main process", stderr
    assert time.monotonic() - started < 60
