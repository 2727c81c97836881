"""Expert-parallel groups composed with TP, PP and DP (Megatron's convention: EP splits the data-parallel ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.state import expert_rank_groups
from megatron_glm.testing import run_distributed


def test_expert_rank_groups_split_the_data_parallel_ranks() -> None:
    # TP2 x DP2 (ranks: tp adjacent): the data-parallel groups are {0, 2} and {1, 3}
    assert expert_rank_groups(4, 2, 1, 1) == ([[0], [2], [1], [3]], [[0, 2], [1, 3]])
    assert expert_rank_groups(4, 2, 1, 2) == ([[0, 2], [1, 3]], [[0], [2], [1], [3]])
    # TP2 x DP4 x PP2, EP2: consecutive data-parallel ranks share an expert group; every rank in exactly one of each
    ep, edp = expert_rank_groups(16, 2, 2, 2)
    assert ep[:2] == [[0, 2], [4, 6]] and edp[:2] == [[0, 4], [2, 6]]
    for groups in (ep, edp):
        assert sorted(r for g in groups for r in g) == list(range(16))
    assert all(len(g) == 2 for g in ep + edp)
    with pytest.raises(ValueError, match="expert-parallel size 3 must divide the data-parallel size 2"):
        expert_rank_groups(4, 2, 1, 3)


def test_single_process_state_has_one_expert_rank() -> None:
    ps = initialize_parallel_state()
    assert (ps.ep_size, ps.ep_rank, ps.edp_size, ps.edp_rank, ps.ep_group, ps.edp_group) == (1, 0, 1, 0, None, None)
    with pytest.raises(RuntimeError, match="expert/context parallelism needs torch.distributed"):
        initialize_parallel_state(ep_size=2)


def _sum(value: float, group: object) -> float:
    t = torch.tensor([value])
    dist.all_reduce(t, group=group)
    return t.item()


def _expert_groups(rank: int, world: int) -> dict:
    out = {}
    for ep in (1, 2):
        ps = initialize_parallel_state(tp_size=2, pp_size=1, ep_size=ep)
        dp = dist.get_process_group_ranks(ps.dp_group)
        edp = dist.get_process_group_ranks(ps.edp_group)
        ep_ranks = [rank] if ps.ep_group is None else dist.get_process_group_ranks(ps.ep_group)
        # the rank arithmetic: data-parallel rank = edp_rank * ep + ep_rank, and the usual Megatron order
        dp_rank = ps.edp_rank * ps.ep_size + ps.ep_rank
        out[ep] = {
            "ranks": (ep_ranks, edp, dp),
            "coords": (ps.tp_rank, ps.dp_rank, ps.ep_rank, ps.edp_rank, ps.edp_size),
            "consistent": dp_rank == ps.dp_rank and ps.rank == rank == dp_rank * ps.tp_size + ps.tp_rank,
            "same_dp_object": ps.edp_group is ps.dp_group,
            "sums": (_sum(rank, ps.edp_group), None if ps.ep_group is None else _sum(rank, ps.ep_group)),
        }
    return out


def test_expert_groups_on_tp2_dp2() -> None:
    res = run_distributed(_expert_groups, 4)
    for rank, r in enumerate(res):
        one, two = r[1], r[2]
        assert one["consistent"] and two["consistent"]
        dp = [rank % 2, rank % 2 + 2]  # {0, 2} or {1, 3}
        # EP = 1: the expert group is the rank alone, the expert-data-parallel group is the data-parallel group
        assert one["ranks"] == ([rank], dp, dp) and one["same_dp_object"]
        assert one["coords"] == (rank % 2, rank // 2, 0, rank // 2, 2) and one["sums"] == (sum(dp), None)
        # EP = 2: the two data-parallel ranks hold different experts; each expert's replicas are one rank
        assert two["ranks"] == (dp, [rank], dp) and not two["same_dp_object"]
        assert two["coords"] == (rank % 2, rank // 2, rank // 2, 0, 1) and two["sums"] == (rank, sum(dp))
    assert ParallelState(dp_size=4, dp_rank=3, ep_size=2, ep_rank=1).edp_rank == 1
