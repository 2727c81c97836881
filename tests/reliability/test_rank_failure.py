"""A rank killed mid-run: the others stop within seconds with one line naming the lost rank (no hang)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_glm.testing import find_free_port
from tests.training.conftest import ROOT, train_args

pytestmark = pytest.mark.slow


def test_killed_rank_is_named_by_the_survivor(tiny_corpus, tmp_path):
    port = find_free_port()
    args = train_args(tiny_corpus, "--train-iters", "100000", "--micro-batch-size", "2", "--global-batch-size", "4")
    procs, outs, errs = [], [], []
    for rank in (0, 1):  # started the way a cluster scheduler does (no launcher to tidy up after us)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        outs.append(tmp_path / f"out{rank}.txt")
        errs.append(tmp_path / f"err{rank}.txt")
        with outs[-1].open("w") as out, errs[-1].open("w") as err:
            procs.append(
                subprocess.Popen([sys.executable, "pretrain_glm.py", *args], cwd=ROOT, env=env, stdout=out, stderr=err)
            )
    try:
        deadline = time.time() + 400
        while "loss" not in outs[0].read_text().split("set-up took")[-1] or "set-up took" not in outs[0].read_text():
            assert time.time() < deadline and all(p.poll() is None for p in procs), errs[0].read_text()[-3000:]
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.time()
        procs[0].wait(timeout=60)
        took = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = Path(errs[0]).read_text()
    assert procs[0].returncode == 2, err[-3000:]
    assert err.splitlines()[-1] == (
        "error: rank 0 of 2: lost contact with rank 1, which exited or was killed (see "
        "its output); stopping this rank too"
    ), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert took < 60
