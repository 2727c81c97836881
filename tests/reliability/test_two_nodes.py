"""examples/two_nodes_one_machine.sh: two torchrun agents (TP=2 x DP=2). Node 1 is killed mid-run; node 0
stops with a one-line error within 60 s; the same command on both nodes resumes from the newest complete
checkpoint and retrains the lost steps bitwise (the first run was the straight run up to the kill)."""

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

from megatron_glm.checkpoint.manager import verify_checkpoint
from megatron_glm.testing import find_free_port
from tests.training.conftest import ROOT, metrics

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "examples" / "two_nodes_one_machine.sh"
FLAGS = shlex.split(
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 "
    "--global-batch-size 4 --lr 1e-3 --train-iters 200 --lr-decay-iters 200 --log-interval 1 --eval-interval 0 "
    "--save-interval 3 --exit-interval 12"
)


def start_node(
    rank: int, corpus: dict, save: Path, port: int, job: str, log: Path, flags: list[str] = FLAGS
) -> subprocess.Popen:
    env = {
        **os.environ,
        "NODE_RANK": str(rank),
        "PY": sys.executable,
        "CONFIG": "",
        "DATA": corpus["data_path"],
        "TOKENIZER": corpus["tokenizer"],
        "SAVE": str(save),
        "PORT": str(port),
        "JOB": job,
        "OMP_NUM_THREADS": "1",
    }
    with log.open("w") as out:
        cmd = ["bash", str(SCRIPT), *flags]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            for child in psutil.Process(p.pid).children(recursive=True):
                child.kill()
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_node_failure_then_restart_on_both_nodes(tiny_corpus: dict, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    port, job = find_free_port(), f"glm-test-{os.getpid()}"
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    nodes = [start_node(r, tiny_corpus, save, port, job, logs[r]) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 400
        while not ((save / "latest").exists() and (save / "metrics.jsonl").exists() and max(metrics(save)) >= 5):
            assert all(n.poll() is None for n in nodes), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.05)
        node1 = psutil.Process(nodes[1].pid)
        procs = [node1, *node1.children(recursive=True)]
        (agent,) = node1.children()  # the script's torchrun; its children are the node's two workers
        assert len(agent.children()) == 2, [p.cmdline() for p in procs]
        for p in reversed(procs):  # the whole node: workers, agent, script
            p.kill()
        killed = time.monotonic()
        _, alive = psutil.wait_procs(procs, timeout=10)
        assert not [p for p in alive if _alive(p)], "node 1's processes survived the kill"
        nodes[0].wait(timeout=90)
        took = time.monotonic() - killed
    finally:
        _stop(nodes)
    out0 = logs[0].read_text()
    assert nodes[0].returncode != 0, out0[-3000:]
    assert took < 60, f"node 0 took {took:.0f} s to stop"
    errors = [line for line in out0.splitlines() if line.startswith("error: ")]
    assert errors and "lost contact with" in errors[0], out0[-3000:]
    first = {s: row["loss"] for s, row in metrics(save).items()}
    latest = (save / "latest").read_text().strip()
    assert verify_checkpoint(save / latest) is None  # the fault left `latest` at a complete checkpoint
    resumed_from = int(latest.removeprefix("global_step"))
    assert resumed_from < max(first) < 12, (resumed_from, sorted(first))

    logs = [tmp_path / f"restart{r}.log" for r in (0, 1)]
    port = find_free_port()
    nodes = [start_node(r, tiny_corpus, save, port, job + "-2", logs[r]) for r in (0, 1)]
    try:
        for n in nodes:
            n.wait(timeout=300)
    finally:
        _stop(nodes)
    out0, out1 = (log.read_text() for log in logs)
    assert all(n.returncode == 0 for n in nodes), out0[-3000:] + out1[-2000:]
    # The c10d rendezvous numbers the agents in the order they join, so global rank 0 (which logs) may be on
    # either node.
    assert f"resumed from {save} at step {resumed_from} ({resumed_from * 4} samples)" in out0 + out1
    again = {s: row["loss"] for s, row in metrics(save).items()}
    assert sorted(again) == list(range(1, 13))  # it trained the later steps, up to the exit interval
    lost = range(resumed_from + 1, max(first) + 1)
    assert [again[s] for s in lost] == [first[s] for s in lost]  # bitwise: the retrained steps
    assert (save / "latest").read_text() == "global_step12" and verify_checkpoint(save / "global_step12") is None
