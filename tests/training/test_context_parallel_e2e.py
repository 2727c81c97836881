"""Context parallelism through pretrain_glm.py: a CP=2 run logs the one-process run's losses (dropout on), and its
checkpoint resumes at CP=1 with the straight run's next losses; PP=2 x CP=2 logs the one-process losses."""

from __future__ import annotations

import json
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


def _valid_losses(save: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["valid_loss"] for row in rows if "valid_loss" in row}


def test_pp2_cp2_matches_one_process_and_pp2_dropout(tiny_corpus: dict, tmp_path: Path) -> None:
    """PP=2 x CP=2 on 4 processes (the pipeline's micro-batches split per context-parallel rank, its loss reduced
    over the group): the training and validation losses of one process (fp32, 1e-5, clipping acting on every step:
    fp32 ZeRO-0's norm counts each parameter once, training/grad_clip.py); with dropout and clipping on, those of
    PP=2 (CP=1's masks; PP=2's own dropout stream differs from one process's, so PP=2 is the reference)."""
    pp_cp = ["--pipeline-model-parallel-size", "2", "--context-parallel-size", "2"]
    evals = ["--eval-interval", "3", "--eval-iters", "1", "--clip-grad", "0.05"]  # below every step's norm

    def run(name: str, nproc: int, *extra: str) -> Path:
        save = tmp_path / name
        out = launch(train_args(tiny_corpus, *FLAGS, "--train-iters", "3", "--save", str(save), *extra), nproc=nproc)
        assert ("each sequence split over cp 2" in out.stdout) == ("--context-parallel-size" in extra)
        return save

    one, ppcp = run("one", 1, *evals), run("ppcp", 4, *evals, *pp_cp)
    assert all(row["grad_norm"] > 0.05 for row in metrics(one).values())  # clipping acts
    pp_drop, ppcp_drop = run("pp_drop", 2, *DROPOUT, *pp_cp[:2]), run("ppcp_drop", 4, *DROPOUT, *pp_cp)
    for ref_dir, got_dir in ((one, ppcp), (pp_drop, ppcp_drop)):
        ref, got = _losses(ref_dir), _losses(got_dir)
        assert sorted(ref) == sorted(got) == [1, 2, 3] and ref[1] != ref[3]
        for step, loss in got.items():
            assert abs(loss - ref[step]) <= 1e-5, (got_dir.name, step, loss, ref[step])
    assert abs(_losses(pp_drop)[1] - _losses(one)[1]) > 1e-4  # dropout really on
    ref_valid, got_valid = _valid_losses(one), _valid_losses(ppcp)
    assert sorted(ref_valid) == sorted(got_valid) == [3]
    assert abs(got_valid[3] - ref_valid[3]) <= 1e-5, (got_valid, ref_valid)
    layout = read_meta(ppcp / "global_step3")["layout"]
    assert (layout["pp"], layout["cp"], layout["dp_x_cp"]) == (2, 2, 2)


def test_cp_config_errors_are_one_line(tiny_corpus: dict, tmp_path: Path) -> None:
    out = launch(
        train_args(
            tiny_corpus,
            "--train-iters",
            "1",
            "--context-parallel-size",
            "3",
            "--lora-rank",
            "4",
            "--lora-dropout",
            "0.1",
        ),
        launcher="python",
        check=False,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr
    assert "data.seq_length (64) must be divisible by 2 x parallel.context_parallel_size (6)" in err[0]
    assert "cannot be combined with lora.dropout > 0" in err[0]
