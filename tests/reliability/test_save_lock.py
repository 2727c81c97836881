"""One run per ``--save``: a second run is refused naming the holder; a killed run's stale lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_glm.locking import LockBusy, acquire_lock
from tests.training.conftest import ROOT, launch, metrics, train_args

pytestmark = pytest.mark.slow


def test_second_run_refused_then_stale_lock_taken_over(tiny_corpus, tmp_path: Path) -> None:
    save = tmp_path / "run"
    args = train_args(tiny_corpus, "--save", str(save), "--save-interval", "100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    err = tmp_path / "err1.txt"
    with err.open("w") as e:
        first = subprocess.Popen(
            [sys.executable, "pretrain_glm.py", *args, "--train-iters", "100000"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=e,
        )
    try:
        deadline = time.monotonic() + 300
        while not ((save / "metrics.jsonl").exists() and metrics(save)):
            assert first.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.1)
        # Two ranks: rank 0 is refused the lock, rank 1 learns it (no hang), both say the one line.
        second = launch([*args, "--train-iters", "2"], nproc=2, launcher="torchrun", check=False, timeout=300)
        assert second.returncode != 0
        lines = [ln for ln in second.stderr.splitlines() if ln.startswith("error: ")]
        expect = f"error: --save {save}: another training run is using it (held by host {socket.gethostname()}, "
        assert len(lines) == 2 and all(ln.startswith(expect) for ln in lines), second.stderr[-3000:]
        assert f"pid {first.pid}, started " in lines[0] and lines[0].endswith(f"lock file {save / '.lock'})")
        assert first.poll() is None  # the holder trains on
        assert not list(save.glob("global_step*"))
    finally:
        first.send_signal(signal.SIGKILL)  # a killed run: its lock record stays behind
        first.wait()
    assert json.loads((save / ".lock").read_text())["pid"] == first.pid
    third = launch([*args, "--train-iters", "2"], launcher="python")
    assert f"warning: taking over the stale lock {save / '.lock'} (held by host {socket.gethostname()}, " in (
        third.stdout
    )
    assert f"pid {first.pid}, started" in third.stdout and "which is no longer running)" in third.stdout
    assert (save / "latest").read_text() == "global_step2"
    assert (save / ".lock").read_text() == ""  # a clean end leaves no record


def test_lock_module_refuses_a_live_holder_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from megatron_glm.locking import acquire_lock; l = acquire_lock({str(path)!r}); "
            "print('held', flush=True); input(); l.release()",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy, match=rf"held by host .*, pid {holder.pid}, started .*; lock file {path}"):
            acquire_lock(path)
    finally:
        holder.communicate("\n")
    with acquire_lock(path, log=lambda line: pytest.fail(line)):  # released cleanly: no stale warning
        assert json.loads(path.read_text())["pid"] == os.getpid()
