"""Exact resume, end to end: every interrupted-and-resumed run reproduces the straight run's losses bitwise.

The base run is the reproduction of issue 12 (dropout at its defaults, 0.1): 20 steps of 8 samples with
``--lr-decay-iters 20``, so a run that ends at step 10 and is extended to 20 follows the same schedule.
Straight runs are made once per layout and shared (the DataLoader worker count and evaluation do not
change training losses, so they vary freely between the straight and the interrupted runs).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_glm.checkpoint.manager import verify_checkpoint
from tests.training.conftest import ROOT, _free_port, launch, metrics

pytestmark = pytest.mark.slow

LAYOUTS = {  # name -> (processes, flags)
    "tp1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "dp2": (2, []),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
}
EVALS = ["--eval-interval", "4", "--eval-iters", "2"]  # evaluations at 4 and 8 (before the step-10 save), 12-20


def base_args(corpus: dict[str, str], layout: str, *extra: str) -> list[str]:
    """The issue's flags (dropout on), 20 steps."""
    return [
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "128",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "8",
        "--lr",
        "1e-3",
        "--seed",
        "1234",
        "--split",
        "98,2,0",
        "--log-interval",
        "1",
        "--lr-decay-iters",
        "20",
        "--train-iters",
        "20",
        "--data-path",
        corpus["data_path"],
        "--tokenizer-model",
        corpus["tokenizer"],
        *LAYOUTS[layout][1],
        *extra,
    ]


def _launch(corpus: dict, layout: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    nproc = LAYOUTS[layout][0]
    return launch(
        base_args(corpus, layout, *extra), nproc=nproc, launcher="python" if nproc == 1 else "torchrun", check=check
    )


def losses(save: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in metrics(save).items()}


def trained_steps(stdout: str) -> list[int]:
    """The steps a run logged a training loss for (its own console, not the metrics file)."""
    return [int(m.group(1)) for m in re.finditer(r"^step\s+(\d+)\s+loss ", stdout, re.MULTILINE)]


@pytest.fixture(scope="module")
def straight(tiny_corpus: dict, tmp_path_factory: pytest.TempPathFactory):
    """``straight(layout, key="loss")``: {step: value} of the uninterrupted 20-step run (made on first use)."""
    cache: dict[str, dict[int, dict]] = {}

    def get(layout: str, key: str = "loss") -> dict[int, float]:
        if layout not in cache:
            save = tmp_path_factory.mktemp(f"straight_{layout}")
            _launch(tiny_corpus, layout, "--save", str(save), "--eval-interval", "0")
            cache[layout] = metrics(save)
            assert sorted(cache[layout]) == list(range(1, 21))
        return {step: row[key] for step, row in cache[layout].items()}

    return get


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_dead(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in procs if _alive(p)]


def interrupt(corpus: dict, layout: str, args: list[str], save: Path, ending: str) -> str:
    """Start the first run under torchrun and end it the way ``ending`` says; returns its console output."""
    nproc = LAYOUTS[layout][0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    console_path = save.parent / "console.txt"
    console = console_path.open("w")
    job = subprocess.Popen(
        [
            torchrun,
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "pretrain_glm.py",
            *base_args(corpus, layout, *args),
        ],
        cwd=ROOT,
        env=env,
        stdout=console,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        ready = (
            (lambda: (save / "latest").exists())
            if ending.startswith("kill9")
            else (lambda: (save / "metrics.jsonl").exists() and len(losses(save)) >= 11)
        )
        while not ready():
            assert job.poll() is None, "the job ended before it could be interrupted"
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)
        launcher = psutil.Process(job.pid)
        workers = [p for p in launcher.children(recursive=True) if "pretrain_glm.py" in " ".join(p.cmdline())]
        assert len([w for w in workers if w.ppid() == job.pid]) == nproc, workers
        if ending == "kill9-workers":  # every worker, then the launcher: a node failing
            for w in workers:
                w.kill()
            assert not _wait_dead(workers, 10)
            job.kill()
        elif ending == "kill9-launcher":  # the launcher alone: its workers must follow it
            job.kill()
            assert not _wait_dead(workers, 10), "workers outlived their killed launcher"
        else:  # SIGTERM to the launcher, which forwards it: the workers save and stop
            job.send_signal(signal.SIGTERM)
            assert not _wait_dead(workers, 60)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        console.close()
    return console_path.read_text()


def resume_case(
    corpus: dict, straight, tmp_path: Path, layout: str, workers: int, ending: str, evals: bool = True
) -> None:
    save = tmp_path / "run"
    args = [
        "--num-workers",
        str(workers),
        "--save",
        str(save),
        "--save-interval",
        "1000" if ending == "sigterm" else "10",  # SIGTERM: no interval checkpoint can pass for the stop's
        *(EVALS if evals else ["--eval-interval", "0"]),
    ]
    console = ""
    if ending == "iters":  # the issue's B: --train-iters 10, then extended to 20
        _launch(corpus, layout, *args, "--train-iters", "10")
    else:
        console = interrupt(corpus, layout, args, save, ending)
    latest = (save / "latest").read_text().strip()
    assert verify_checkpoint(save / latest) is None  # the fault left `latest` at a complete checkpoint
    step = int(latest.removeprefix("global_step"))
    if ending.startswith("kill9"):
        assert step == 10
        assert not list(save.glob("global_step2*")), "a step-20 checkpoint: the kill did not stop training"
    elif ending == "sigterm":  # the one checkpoint is at the step every rank agreed to stop at
        agreed = re.findall(r"received signal 15: saving and stopping at step (\d+)", console)
        assert agreed and int(agreed[-1]) == step, console[-3000:]
        assert 10 < step < 20 and sorted(p.name for p in save.glob("global_step*")) == [latest]
        assert "DataLoader worker" not in console, console[-3000:]
    else:
        assert step == 10
    proc = _launch(corpus, layout, *args, "--load", str(save))
    assert f"at step {step} ({step * 8} samples)" in proc.stdout
    assert trained_steps(proc.stdout) == list(range(step + 1, 21))  # it really trained the rest
    if evals:
        assert "[eval] step     20" in proc.stdout
    assert losses(save) == straight(layout)  # bitwise: data position, LR, optimizer and RNG all restored


# Pairs, not the full product: each layout once; each ending on a non-pipelined and a pipelined layout;
# 0, 1 (the default) and 2 DataLoader workers, 2 on one and two stages; evaluation on everywhere but in the
# issue's exact reproduction (which must stay as filed). 4 processes cost the most on CPU, so TP2xPP2 appears once.
MATRIX = [
    ("tp1", 0, "iters"),  # the reproduction on one process (+ evaluations before and after the save)
    ("dp2", 1, "sigterm"),  # the default worker count: the worker shares the signalled process group
    ("pp2", 2, "kill9-launcher"),  # also: a killed launcher takes its workers down
    ("tp2pp2", 2, "sigterm"),
]


@pytest.mark.parametrize("layout,workers,ending", MATRIX, ids=[f"{a}-w{b}-{c}" for a, b, c in MATRIX])
def test_resume_matrix(layout: str, workers: int, ending: str, tiny_corpus: dict, straight, tmp_path: Path) -> None:
    resume_case(tiny_corpus, straight, tmp_path, layout, workers, ending)


def test_issue_reproduction_tp2_is_bitwise(tiny_corpus: dict, straight, tmp_path: Path) -> None:
    """Issue 12 as filed: TP=2, default workers, --train-iters 10 then 20: step 11 used to differ."""
    resume_case(tiny_corpus, straight, tmp_path, "tp2", 1, "iters", evals=False)


def test_resume_after_kill_matches_uninterrupted(tiny_corpus: dict, straight, tmp_path: Path) -> None:
    """kill -9 of every worker (and the launcher) after the step-10 checkpoint, then resume: steps 11-20."""
    resume_case(tiny_corpus, straight, tmp_path, "tp2", 2, "kill9-workers")


# -- stop controls (one process) -------------------------------------------------------------------


def test_exit_duration_stops_and_resumes_bitwise(tiny_corpus: dict, straight, tmp_path: Path) -> None:
    """A limit already passed at the first step: every launch trains one step, saves and stops."""
    save = tmp_path / "run"
    args = ["--save", str(save), "--exit-duration-in-mins", "1e-6", "--eval-interval", "0", "--train-iters", "2"]
    first = _launch(tiny_corpus, "tp1", *args)
    assert "exit duration of 1e-06 min reached: saving and stopping at step 1" in first.stdout
    assert (save / "latest").read_text() == "global_step1"
    second = _launch(tiny_corpus, "tp1", *args, "--load", str(save))
    assert trained_steps(second.stdout) == [2] and (save / "latest").read_text() == "global_step2"
    # --lr-decay-iters 20 fixes the schedule, so these are the first steps of the 20-step run
    assert losses(save) == {s: straight("tp1")[s] for s in (1, 2)}


def test_skip_iteration_range_consumes_samples_without_updates(tiny_corpus: dict, straight, tmp_path: Path) -> None:
    skip = ["--skip-train-iteration-range", "3-4", "12-12", "--eval-interval", "0"]
    whole = tmp_path / "whole"
    proc = _launch(tiny_corpus, "tp1", *skip, "--save", str(whole))
    assert "step 3: skipped (training.skip_train_iteration_range), 8 samples consumed" in proc.stdout
    rows, ref = metrics(whole), straight("tp1")
    assert sorted(rows) == [s for s in range(1, 21) if s not in (3, 4, 12)]
    assert [rows[s]["loss"] for s in (1, 2)] == [ref[1], ref[2]]
    assert rows[5]["consumed_samples"] == 40 and rows[5]["loss"] != ref[5]  # same samples, two updates fewer
    # the schedule counts updates: step 5 is the third update, at the rate the straight run used at step 3
    assert rows[5]["lr"] == straight("tp1", "lr")[3]
    # --exit-interval stops and the resume is bitwise (also across the skipped ranges): the same run, stopped at 11
    stopped = tmp_path / "stopped"
    args = [*skip, "--save", str(stopped), "--exit-interval", "11"]
    first = _launch(tiny_corpus, "tp1", *args)
    assert "exit interval 11 reached: saving and stopping at step 11" in first.stdout
    assert trained_steps(first.stdout) == [1, 2, *range(5, 12)]
    assert (stopped / "latest").read_text() == "global_step11" and verify_checkpoint(stopped / "global_step11") is None
    second = _launch(tiny_corpus, "tp1", *args, "--load", str(stopped))
    assert trained_steps(second.stdout) == list(range(13, 21)) and "exit interval" not in second.stdout
    assert losses(stopped) == losses(whole)
