"""ParallelState: Megatron rank order and working groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_glm.parallel import ParallelState, initialize_parallel_state, rank_grid
from megatron_glm.testing import run_distributed


def test_rank_grid_megatron_order() -> None:
    grid = rank_grid(8, tp_size=2, pp_size=2)
    assert grid == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]  # tp adjacent, then dp, then pp
    with pytest.raises(ValueError, match="not divisible"):
        rank_grid(6, 4, 1)


def test_single_process_state_needs_no_group() -> None:
    ps = initialize_parallel_state()
    assert ps == ParallelState() and ps.world_size == 1 and ps.is_first_stage and ps.is_last_stage


def _groups(rank: int, world: int) -> dict:
    ps = initialize_parallel_state(tp_size=2, pp_size=2)
    assert ps.rank == rank
    out = {"tp": ps.tp_rank, "pp": ps.pp_rank, "dp": ps.dp_rank}
    for name in ("tp", "pp"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=getattr(ps, f"{name}_group"))
        out[f"{name}_sum"] = t.item()
    return out


def test_tp2_pp2_groups_on_four_ranks() -> None:
    res = run_distributed(_groups, 4)
    assert [(r["tp"], r["pp"], r["dp"]) for r in res] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert [r["tp_sum"] for r in res] == [1, 1, 5, 5]  # {0,1} and {2,3}
    assert [r["pp_sum"] for r in res] == [2, 4, 2, 4]  # {0,2} and {1,3}


def _fail(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank one")


def test_harness_reports_child_traceback() -> None:
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_distributed(_fail, 2, timeout=60)
