"""A stopped job keeps its work: a signal through each launcher saves a checkpoint at the step where it arrived.

Launchers signal a worker's whole process group (Ctrl-C in a terminal, the deepspeed launcher's process tree,
torchrun's ``killpg``), so the default DataLoader worker (``num_workers 1``) receives the signal as well; it
used to die first and abort the trainer with "DataLoader worker ... is killed by signal". No interval
checkpoint can coincide (``--save-interval 100000``): the one checkpoint is the stop's, at the step every
rank agreed on. The torchrun agent's SIGTERM (with a resume) is in ``test_resume.py``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_glm.checkpoint.manager import verify_checkpoint
from tests.training.conftest import ROOT, _free_port, metrics, train_args

pytestmark = pytest.mark.slow

STOP_RE = re.compile(r"received signal (\d+): saving and stopping at step (\d+)")


def stop_step(stdout: str, signum: int) -> int:
    """The step the ranks agreed to stop at, from the run's own line."""
    found = STOP_RE.findall(stdout)
    assert found, stdout[-3000:]
    assert int(found[-1][0]) == signum, found
    return int(found[-1][1])


def signal_run(cmd: list[str], save: Path, tmp_path: Path, signum: int, *, whole_group: bool = True) -> str:
    """Start ``cmd`` in a session of its own, signal it after two logged steps; its stdout once it ended."""
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with out.open("w") as o, err.open("w") as e:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((save / "metrics.jsonl").exists() and len(metrics(save)) >= 2):
            assert job.poll() is None, f"the job ended early:\n{err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.05)
        if whole_group:  # a terminal's Ctrl-C, a scheduler's signal to the job step
            os.killpg(job.pid, signum)
        else:
            job.send_signal(signum)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    text, errors = out.read_text(), err.read_text()
    assert "DataLoader worker" not in errors, errors[-3000:]
    return text + errors


def assert_stop_checkpoint(save: Path, step: int, files: int = 1) -> None:
    """The only checkpoint is the stop's, complete, at ``step`` (no interval one could satisfy this)."""
    assert 0 < step < 100000
    assert sorted(p.name for p in save.glob("global_step*")) == [f"global_step{step}"]
    assert (save / "latest").read_text() == f"global_step{step}"
    assert verify_checkpoint(save / f"global_step{step}") is None
    model_files = list((save / f"global_step{step}").glob("mp_rank_*_model_states.pt"))
    assert len(model_files) == files, model_files  # every tensor-parallel rank wrote its part
    assert max(metrics(save)) == step  # and trained no further


def stop_args(corpus: dict, save: Path) -> list[str]:
    return train_args(corpus, "--train-iters", "100000", "--save", str(save), "--save-interval", "100000")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_plain_process_signal_saves_at_the_agreed_step(tiny_corpus, tmp_path: Path, signum: int) -> None:
    save = tmp_path / "run"
    text = signal_run([sys.executable, "pretrain_glm.py", *stop_args(tiny_corpus, save)], save, tmp_path, signum)
    assert_stop_checkpoint(save, stop_step(text, signum))


def test_deepspeed_launcher_ctrl_c_saves_at_the_agreed_step(tiny_corpus, tmp_path: Path) -> None:
    """Ctrl-C under ``deepspeed --num_gpus 2`` (TP 2): SIGINT to the terminal's whole process group."""
    save = tmp_path / "run"
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [
        deepspeed,
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        "pretrain_glm.py",
        *stop_args(tiny_corpus, save),
        "--tensor-model-parallel-size",
        "2",
    ]
    text = signal_run(cmd, save, tmp_path, signal.SIGINT)
    assert_stop_checkpoint(save, stop_step(text, signal.SIGINT), files=2)
