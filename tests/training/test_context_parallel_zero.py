"""Context parallelism with data parallelism and ZeRO through the real set-up and trainer (DeepSpeed reduces the
gradients over dp x cp): the losses of dp2 x cp2 equal dp2's, and ZeRO-3 at cp2 equals one process. The ZeRO-2
optimizer is partitioned over dp x cp, so a resume at another C is a resume at another DP: refused with the convert
command, whose universal checkpoint then resumes dp2 x cp1 with the straight run's next losses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint
from megatron_glm.errors import CheckpointError
from megatron_glm.testing import run_distributed
from tests.training.harness import build_trainer, tiny_config

pytestmark = pytest.mark.slow


def _losses(rank: int, world: int, assignments: dict, load: str = "") -> dict[int, float] | str:
    """The logged losses by step (a refused resume: its message)."""
    cfg = tiny_config(**{"training.micro_batch_size": 2, **assignments})
    trainer, ps, logger = build_trainer(cfg)
    assert ps.cp_size == cfg.parallel.context_parallel_size and ps.grad_dp_size == ps.dp_size * ps.cp_size
    assert trainer.engine.dp_world_size == ps.grad_dp_size  # DeepSpeed averages over dp x cp
    if load:
        try:
            assert trainer.resume(load)
        except CheckpointError as exc:
            return str(exc)
    trainer.train()
    return {step: row["loss"] for step, row in logger.rows if "loss" in row}


def _close(got: dict[int, float], ref: dict[int, float], what: str) -> None:
    assert max(abs(loss - ref[step]) for step, loss in got.items()) <= 1e-5, (what, got, ref)


@pytest.mark.parametrize("stage,world,ref_world", [(2, 4, 2), (3, 2, 1)], ids=["dp2xcp2-zero2", "cp2-zero3"])
def test_context_parallel_with_dp_and_zero(stage: int, world: int, ref_world: int, tmp_path: Path) -> None:
    iters = 5 if stage == 2 else 3  # ZeRO-2: steps 4-5 for the resume
    common = {"training.zero_stage": stage, "training.global_batch_size": 2 * ref_world * 2}
    common["training.train_iters"] = iters
    ref = run_distributed(_losses, ref_world, common)[0]
    cp2 = {**common, "parallel.context_parallel_size": 2}
    if stage == 2:
        cp2.update({"training.exit_interval": 3, "checkpoint.save": str(tmp_path / "cp2")})
    got = run_distributed(_losses, world, cp2)
    assert sorted(ref) == list(range(1, iters + 1)) and ref[1] != ref[3]
    for rank, losses in enumerate(got):
        assert sorted(losses) == [1, 2, 3], (rank, losses)
        _close(losses, ref, f"rank {rank}")
    if stage != 2:
        return

    # the same dp2 at cp1: the optimizer's 4 partitions are refused with the command that converts them
    refused = run_distributed(_losses, ref_world, common, str(tmp_path / "cp2"))[0]
    assert isinstance(refused, str) and "saved with dp_x_cp=4 but this run has dp_x_cp=2" in refused, refused
    command = re.search(r"with: python tools/convert_checkpoint\.py ([^,]*), then resume with --load (\S+)$", refused)
    assert command, refused
    args = dict(zip(*[iter(shlex.split(command.group(1)))] * 2, strict=True))
    assert args["--format"] == "universal" and command.group(2) == args["--output"]
    convert_checkpoint(args["--input"], args["--output"], ConvertOptions(format="universal"), log=lambda _: None)

    resumed = {**common, "checkpoint.save": str(tmp_path / "resumed")}
    after = run_distributed(_losses, ref_world, resumed, command.group(2))
    for rank, losses in enumerate(after):
        assert sorted(losses) == [4, 5], (rank, losses)  # it trained the later steps, from the data position 3
        _close(losses, ref, f"resumed rank {rank}")
    assert (tmp_path / "resumed" / "latest").read_text().strip() == "global_step5"
