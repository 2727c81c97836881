"""End-to-end pretraining through pretrain_glm.py under torchrun / deepspeed on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training.conftest import ROOT, launch, metrics, train_args

pytestmark = pytest.mark.slow
GOLDEN = ROOT / "tests" / "golden" / "glm_tiny_losses.json"


def _losses(save: Path) -> list[float]:
    m = metrics(save)
    return [m[s]["loss"] for s in sorted(m)]


def test_tp2_and_dp2_match_tp1_and_loss_decreases(tiny_corpus: dict, tmp_path: Path) -> None:
    """Same global batches (4 samples as 2 micro-batches of 2): TP=2 and DP=2 reproduce TP=1 in fp32."""
    common = ["--train-iters", "8", "--micro-batch-size", "2", "--global-batch-size", "4"]
    launch(train_args(tiny_corpus, *common, "--save", str(tmp_path / "tp1")), nproc=1)
    launch(
        train_args(tiny_corpus, *common, "--tensor-model-parallel-size", "2", "--save", str(tmp_path / "tp2")),
        nproc=2,
        launcher="deepspeed",
    )
    launch(train_args(tiny_corpus, *common, "--save", str(tmp_path / "dp2")), nproc=2)
    tp1, tp2, dp2 = (_losses(tmp_path / n) for n in ("tp1", "tp2", "dp2"))
    assert len(tp1) == 8
    assert max(abs(a - b) for a, b in zip(tp1, tp2)) < 1e-5, (tp1, tp2)
    assert max(abs(a - b) for a, b in zip(tp1, dp2)) < 1e-5, (tp1, dp2)
    assert sum(tp1[-3:]) / 3 < sum(tp1[:3]) / 3 - 0.15, tp1  # learning
    saved = sorted(p.name for p in (tmp_path / "tp2").iterdir() if p.name.startswith("global_step"))
    assert saved == ["global_step8"]


@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
def test_dp2_zero_stages_train(zero: str, tiny_corpus: dict, tmp_path: Path) -> None:
    ds = str(ROOT / "ds_configs" / f"{zero}.json")
    args = train_args(
        tiny_corpus,
        "--train-iters",
        "12",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "8",
        "--deepspeed_config",
        ds,
        "--save",
        str(tmp_path / zero),
    )
    launch(args, nproc=2, launcher="deepspeed")
    losses = _losses(tmp_path / zero)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.6, losses


def test_truncated_checkpoint_falls_back(tiny_corpus: dict, tmp_path: Path) -> None:
    save = tmp_path / "ck"
    args = train_args(
        tiny_corpus,
        "--train-iters",
        "4",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "2",
        "--save",
        str(save),
        "--save-interval",
        "2",
    )
    launch(args, nproc=1)
    f = save / "global_step4" / "mp_rank_00_model_states.pt"
    os.truncate(f, f.stat().st_size // 3)
    proc = launch(
        train_args(
            tiny_corpus,
            "--train-iters",
            "6",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "2",
            "--save",
            str(save),
            "--load",
            str(save),
        ),
        nproc=1,
    )
    assert "skipping checkpoint global_step4" in proc.stdout and "truncated" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert (save / "latest").read_text() == "global_step6"


def test_nonfinite_losses_stop_with_clear_error(tiny_corpus: dict, tmp_path: Path) -> None:
    args = train_args(
        tiny_corpus,
        "--train-iters",
        "40",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "2",
        "--lr",
        "1e6",
        "--clip-grad",
        "0",
        "--lr-warmup-iters",
        "0",
        "--lr-decay-style",
        "constant",
        "--training.max_nonfinite_steps",
        "3",
    )
    proc = launch(args, nproc=1, launcher="python", check=False)
    assert proc.returncode == 2
    err = proc.stderr + proc.stdout
    assert "3 consecutive steps with non-finite loss" in err and "Traceback" not in proc.stderr, err[-3000:]
    assert "non-finite micro-batch loss(es) skipped" in proc.stdout


def test_golden_losses(tiny_corpus: dict, tmp_path: Path) -> None:
    """The first steps of glm-tiny on the embedded corpus match the recorded golden losses.

    Regenerate after an intended change with ``MEGATRON_GLM_UPDATE_GOLDEN=1 pytest -k golden``.
    """
    args = train_args(tiny_corpus, "--train-iters", "6", "--micro-batch-size", "4", "--global-batch-size", "4")
    launch([*args, "--save", str(tmp_path / "g")], nproc=1)
    losses = _losses(tmp_path / "g")
    if os.environ.get("MEGATRON_GLM_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"args": args[8:], "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert len(losses) == len(golden)
    assert max(abs(a - b) for a, b in zip(losses, golden)) < 1e-4, (losses, golden)


def test_sigterm_saves_and_stops(tiny_corpus: dict, tmp_path: Path) -> None:
    save = tmp_path / "sig"
    args = train_args(
        tiny_corpus,
        "--train-iters",
        "100000",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "2",
        "--save",
        str(save),
    )
    job = subprocess.Popen(
        [sys.executable, "pretrain_glm.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 300
    while not ((save / "metrics.jsonl").exists() and (save / "metrics.jsonl").read_text().count("\n") >= 3):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert "received signal 15" in out
    step = int((save / "latest").read_text().removeprefix("global_step"))
    assert 3 <= step < 100000 and metrics(save)[step]["step"] == step


def test_performance_levers_match_plain_run(tiny_corpus: dict, tmp_path: Path) -> None:
    """TP2 with --sequence-parallel, the fused chunked head, activation checkpointing and --compile reproduces
    the plain TP1 losses in fp32 (one launch for all levers keeps the test short)."""
    common = ["--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size", "2"]
    launch(train_args(tiny_corpus, *common, "--save", str(tmp_path / "plain")), nproc=1)
    levers = launch(
        train_args(
            tiny_corpus,
            *common,
            "--tensor-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--model.head_chunk_size",
            "16",
            "--checkpoint-activations",
            "--compile",
            "--save",
            str(tmp_path / "levers"),
        ),
        nproc=2,
    )
    assert "first step (includes torch.compile)" in levers.stdout
    plain, fast = _losses(tmp_path / "plain"), _losses(tmp_path / "levers")
    assert len(plain) == 4
    assert max(abs(a - b) for a, b in zip(plain, fast, strict=True)) < 1e-5, (plain, fast)


def test_document_isolation_pipeline_matches_one_process(tiny_corpus: dict, tmp_path: Path) -> None:
    """--reset-attention-mask: the [b, 1, s, s] document mask travels through DeepSpeed's pipeline (PP=2 equals
    one process in fp32). The pydoc documents are long: the first 16 windows hold one document each (losses
    equal to a run without the flag), sample 16 (step 5) is the first to hold two (its loss differs)."""
    common = ["--train-iters", "5", "--micro-batch-size", "4", "--global-batch-size", "4"]
    iso = [*common, "--reset-attention-mask"]
    launch(train_args(tiny_corpus, *iso, "--save", str(tmp_path / "pp1")), nproc=1)
    pipe = ["--pipeline-model-parallel-size", "2", "--save", str(tmp_path / "pp2")]
    launch(train_args(tiny_corpus, *iso, *pipe), nproc=2)
    launch(train_args(tiny_corpus, *common, "--save", str(tmp_path / "plain")), nproc=1)
    one, two, plain = (_losses(tmp_path / n) for n in ("pp1", "pp2", "plain"))
    assert len(one) == len(two) == len(plain) == 5
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, (one, two)
    assert one[:4] == plain[:4], (one, plain)
    assert abs(one[4] - plain[4]) > 1e-4, (one, plain)
