"""Context parallelism with data parallelism and ZeRO through the real set-up and trainer (DeepSpeed reduces the
gradients over dp x cp): the losses of dp2 x cp2 equal dp2's, and ZeRO-3 at cp2 equals one process."""

from __future__ import annotations

import pytest

from megatron_glm.testing import run_distributed
from tests.training.harness import build_trainer, tiny_config

pytestmark = pytest.mark.slow


def _losses(rank: int, world: int, assignments: dict) -> list[float]:
    cfg = tiny_config(**{"training.train_iters": 3, "training.micro_batch_size": 2, **assignments})
    trainer, ps, logger = build_trainer(cfg)
    assert ps.cp_size == cfg.parallel.context_parallel_size and ps.grad_dp_size == ps.dp_size * ps.cp_size
    assert trainer.engine.dp_world_size == ps.grad_dp_size  # DeepSpeed averages over dp x cp
    trainer.train()
    return [row["loss"] for _, row in logger.rows if "loss" in row]


@pytest.mark.parametrize("stage,world,ref_world", [(2, 4, 2), (3, 2, 1)], ids=["dp2xcp2-zero2", "cp2-zero3"])
def test_context_parallel_with_dp_and_zero(stage: int, world: int, ref_world: int) -> None:
    common = {"training.zero_stage": stage, "training.global_batch_size": 2 * ref_world * 2}
    ref = run_distributed(_losses, ref_world, common)[0]
    got = run_distributed(_losses, world, {**common, "parallel.context_parallel_size": 2})
    assert len(ref) == 3 and ref[0] != ref[2]
    for rank, losses in enumerate(got):
        assert max(abs(a - b) for a, b in zip(losses, ref, strict=True)) <= 1e-5, (rank, losses, ref)
