"""A frozen rank (``SIGSTOP``: the process is there, its sockets open, nothing answers) under torchrun and
under the two-node recipe: the other ranks do not wait in their collective for the process-group timeout
(30 minutes; forever-looking, as on NCCL) but exit within 60 s with one line naming it (the heartbeat watch,
``--heartbeat-timeout``, default 30 s)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_glm.testing import find_free_port
from tests.reliability.test_two_nodes import start_node
from tests.training.conftest import ROOT, metrics, train_args

pytestmark = pytest.mark.slow

FLAGS = shlex.split(  # the two-node test's run, without an exit interval: it must still be training when frozen
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 "
    "--global-batch-size 4 --lr 1e-3 --train-iters 100000 --log-interval 1 --eval-interval 0 --save-interval 100000"
    # the default (30 s) is checked under torchrun; here a shorter one, set on the recipe's command line
    " --heartbeat-timeout 10"
)


def _workers(root: int) -> dict[int, psutil.Process]:
    """The pretrain_glm.py processes under ``root``, by global rank (not their DataLoader workers)."""

    out = {}
    for p in psutil.Process(root).children(recursive=True):
        try:  # a worker has RANK in its environment, its parent (the launcher) does not; DataLoader workers' do
            if "RANK" in p.environ() and "RANK" not in p.parent().environ():
                out[int(p.environ()["RANK"])] = p
        except psutil.NoSuchProcess:
            pass
    return out


def _freeze_and_time(victim: psutil.Process, survivors: list[psutil.Process]) -> float:
    """SIGSTOP ``victim``; seconds until every survivor has exited (at most 90)."""
    victim.suspend()
    frozen = time.monotonic()
    while victim.status() != psutil.STATUS_STOPPED:  # the signal is delivered asynchronously
        assert time.monotonic() - frozen < 5, victim.status()
        time.sleep(0.01)
    _, alive = psutil.wait_procs(survivors, timeout=90)
    assert not alive, f"still running 90 s after the freeze: {[p.pid for p in alive]}"
    return time.monotonic() - frozen


def _kill_session(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process under it (launchers start workers in sessions of their own); SIGKILL
    ends stopped processes too."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_until(ready, procs: list[subprocess.Popen], log: Path, limit: float = 400) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        assert all(p.poll() is None for p in procs), log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.2)


def _line(rank: int, world: int, lost: int) -> str:
    return (
        f"error: rank {rank} of {world}: lost contact with rank {lost}, which exited, was killed or froze: "
        "silent for 30 s (see its output); stopping this rank too"
    )


def test_frozen_rank_under_torchrun(tiny_corpus, tmp_path):
    log = tmp_path / "run.log"
    args = train_args(tiny_corpus, "--train-iters", "100000", "--micro-batch-size", "2", "--global-batch-size", "4")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port"]
    cmd += [str(find_free_port()), "pretrain_glm.py", *args]
    with log.open("w") as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(lambda: "loss" in log.read_text().partition("set-up took")[2], [job], log)
        workers = _workers(job.pid)
        assert sorted(workers) == [0, 1], workers
        took = _freeze_and_time(workers[1], [workers[0]])
    finally:
        _kill_session(job)
    text = log.read_text()
    assert _line(0, 2, 1) in text.splitlines(), text[-3000:]
    print(f"rank 0 stopped {took:.1f} s after rank 1 froze")
    assert took < 60, f"rank 0 took {took:.0f} s to stop"


def test_frozen_rank_on_two_nodes(tiny_corpus, tmp_path):
    save = tmp_path / "ckpt"
    port, job = find_free_port(), f"glm-frozen-{os.getpid()}"
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    corpus = dict(tiny_corpus)
    nodes = [start_node(r, corpus, save, port, job, logs[r], flags=FLAGS) for r in (0, 1)]
    try:
        _wait_until(lambda: (save / "metrics.jsonl").exists() and max(metrics(save), default=0) >= 2, nodes, logs[0])
        on_node = [_workers(n.pid) for n in nodes]
        assert sorted([*on_node[0], *on_node[1]]) == [0, 1, 2, 3], on_node
        victim = min(on_node[1])  # a worker of the node that does not host the rendezvous store
        took = _freeze_and_time(on_node[1][victim], list(on_node[0].values()))
        nodes[0].wait(timeout=60)  # node 0's agent and script follow their workers
    finally:
        for n in nodes:
            _kill_session(n)
    out0 = logs[0].read_text()
    assert nodes[0].returncode != 0, out0[-3000:]
    errors = [line for line in out0.splitlines() if line.startswith("error: ")]
    # every line names the frozen rank (a survivor that its launcher stopped first may print none)
    assert errors and all(f"lost contact with rank {victim}, " in e for e in errors), out0[-3000:]
    assert any("silent for 10 s" in e for e in errors), out0[-3000:]  # the recipe passed --heartbeat-timeout on
    print(f"node 0 stopped {took:.1f} s after rank {victim} froze")
    assert took < 60, f"node 0's workers took {took:.0f} s to stop"
