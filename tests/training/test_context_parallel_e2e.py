"""Context parallelism through pretrain_glm.py: a CP=2 run logs the one-process run's losses (dropout on), and its
checkpoint resumes at CP=1 with the straight run's next losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_glm.checkpoint.manager import read_meta
from tests.training.conftest import launch, metrics, train_args

pytestmark = pytest.mark.slow

FLAGS = [
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--zero-stage",
    "0",  # fp32 ZeRO-0: the optimizer state is whole (ZeRO shards follow dp x cp, see docs/parallelism)
    "--seed",
    "7",
    "--lr-decay-iters",
    "6",
    "--save-interval",
    "1000",
]
DROPOUT = ["--model.hidden_dropout", "0.1", "--model.attention_dropout", "0.1"]  # after train_args' zeros: wins


def _losses(save: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in metrics(save).items()}


def test_cp2_matches_cp1_and_resumes_at_cp1(tiny_corpus: dict, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    launch(train_args(tiny_corpus, *FLAGS, *DROPOUT, "--train-iters", "6", "--save", str(straight)), launcher="python")
    ref = _losses(straight)
    assert sorted(ref) == list(range(1, 7))

    cp2 = tmp_path / "cp2"
    out = launch(
        train_args(
            tiny_corpus, *FLAGS, *DROPOUT, "--train-iters", "3", "--save", str(cp2), "--context-parallel-size", "2"
        ),
        nproc=2,
    )
    assert "each sequence split over cp 2" in out.stdout
    got = _losses(cp2)
    assert sorted(got) == [1, 2, 3]
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= 1e-5, (step, loss, ref[step])
    layout = read_meta(cp2 / "global_step3")["layout"]
    assert (layout["dp"], layout["cp"]) == (1, 2)

    resumed = tmp_path / "resumed"
    launch(
        train_args(tiny_corpus, *FLAGS, *DROPOUT, "--train-iters", "6", "--load", str(cp2), "--save", str(resumed)),
        launcher="python",
    )
    after = _losses(resumed)
    assert sorted(after) == [4, 5, 6]
    for step, loss in after.items():
        assert abs(loss - ref[step]) <= 1e-5, (step, loss, ref[step])


def test_cp_config_errors_are_one_line(tiny_corpus: dict, tmp_path: Path) -> None:
    out = launch(
        train_args(
            tiny_corpus, "--train-iters", "1", "--context-parallel-size", "3", "--pipeline-model-parallel-size", "2"
        ),
        launcher="python",
        check=False,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr
    assert "data.seq_length (64) must be divisible by 2 x parallel.context_parallel_size (6)" in err[0]
    assert "cannot be combined with parallel.pipeline_model_parallel_size > 1" in err[0]
