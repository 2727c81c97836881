"""Explicit parallel state: tensor / context / pipeline / data / expert-parallel groups, sizes and ranks.

Rank order follows Megatron (tp-cp-dp-pp): tensor-parallel ranks are adjacent, then context-parallel, then
data-parallel, then pipeline: ``rank = pp_rank * (dp * cp * tp) + (dp_rank * cp + cp_rank) * tp + tp_rank``.
The ``dp * cp`` ranks of a (pipeline stage, tensor rank) reduce gradients together (``dp_cp_group``, DeepSpeed's
data-parallel group: its "data-parallel rank" is ``dp_rank * cp + cp_rank``); the ``cp`` ranks of a context-parallel
group read the same batch and each hold ``1/cp`` of every sequence (:mod:`megatron_glm.parallel.context_parallel`);
``dp_group`` is the pure data-parallel group (ranks reading different batches).

Expert parallelism (Megatron's convention, and DeepSpeed MoE's) splits the data-parallel ranks: ``ep`` must divide
``dp``; the ``ep`` consecutive data-parallel ranks ``[b ep, (b + 1) ep)`` of a (pipeline stage, tensor rank) form an
expert-parallel group (each holds ``E / ep`` experts; ``ep_rank = dp_rank % ep``), and the ranks holding the same
experts, ``dp / ep`` of them, form the expert-data-parallel group that reduces the experts' gradients
(``edp_rank = dp_rank // ep``). Tensor parallelism stays inside each expert (expert tensor parallelism = TP).
With ``ep = 1`` the expert-parallel group is one rank (``ep_group`` ``None``: nothing to communicate) and the
expert-data-parallel group is the data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    """Process groups and coordinates of this rank.

    Groups are ``None`` only without ``torch.distributed`` (single process); communication helpers treat a
    ``None`` or size-1 group as "nothing to do".
    """

    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Any = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Any = None
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Any = None
    edp_group: Any = None
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: Any = None
    dp_cp_group: Any = None

    @property
    def grad_dp_size(self) -> int:
        """Ranks reducing gradients together (DeepSpeed's data-parallel world): ``dp * cp``."""
        return self.dp_size * self.cp_size

    @property
    def grad_dp_rank(self) -> int:
        """This rank's index among them: ``dp_rank * cp + cp_rank``."""
        return self.dp_rank * self.cp_size + self.cp_rank

    @property
    def grad_dp_group(self) -> Any:
        """The gradient-reduction group (``dp_cp_group``; the data-parallel group without context parallelism)."""
        return self.dp_cp_group if self.dp_cp_group is not None else self.dp_group

    @property
    def edp_size(self) -> int:
        """Ranks holding the same experts (they reduce those experts' gradients): ``dp / ep``."""
        return self.dp_size // self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep_size

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size * self.cp_size

    @property
    def rank(self) -> int:
        return self.pp_rank * self.grad_dp_size * self.tp_size + self.grad_dp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def __repr__(self) -> str:  # groups are opaque handles; keep the repr readable
        return (
            f"ParallelState(rank={self.rank}, tp={self.tp_rank}/{self.tp_size}, "
            f"pp={self.pp_rank}/{self.pp_size}, dp={self.dp_rank}/{self.dp_size}"
            + (f", cp={self.cp_rank}/{self.cp_size}" if self.cp_size > 1 else "")
            + (f", ep={self.ep_rank}/{self.ep_size})" if self.ep_size > 1 else ")")
        )


def rank_grid(world_size: int, tp_size: int, pp_size: int) -> list[list[list[int]]]:
    """``grid[pp][dp][tp]`` = global rank, in Megatron order."""
    if tp_size <= 0 or pp_size <= 0 or world_size % (tp_size * pp_size):
        raise ValueError(f"world size {world_size} is not divisible by tp {tp_size} x pp {pp_size}")
    dp_size = world_size // (tp_size * pp_size)
    return [
        [[p * dp_size * tp_size + d * tp_size + t for t in range(tp_size)] for d in range(dp_size)]
        for p in range(pp_size)
    ]


def expert_rank_groups(
    world_size: int, tp_size: int, pp_size: int, ep_size: int
) -> tuple[list[list[int]], list[list[int]]]:
    """``(expert-parallel groups, expert-data-parallel groups)`` as lists of global ranks (module docstring)."""
    grid = rank_grid(world_size, tp_size, pp_size)
    dp_size = len(grid[0])
    if ep_size <= 0 or dp_size % ep_size:
        raise ValueError(
            f"the expert-parallel size {ep_size} must divide the data-parallel size {dp_size} (experts are split over "
            "data-parallel ranks)"
        )
    ep_groups, edp_groups = [], []
    for p in range(pp_size):
        for t in range(tp_size):
            dp_ranks = [grid[p][d][t] for d in range(dp_size)]
            ep_groups += [dp_ranks[b : b + ep_size] for b in range(0, dp_size, ep_size)]
            edp_groups += [dp_ranks[e::ep_size] for e in range(ep_size)]
    return ep_groups, edp_groups


def initialize_parallel_state(tp_size: int = 1, pp_size: int = 1, ep_size: int = 1, cp_size: int = 1) -> ParallelState:
    """Build groups from the initialised default process group (or a single-process state).

    Every rank must call this with the same sizes (``new_group`` is collective).
    """
    if not dist.is_available() or not dist.is_initialized():
        if tp_size != 1 or pp_size != 1 or ep_size != 1 or cp_size != 1:
            raise RuntimeError(
                "tensor/pipeline/expert/context parallelism needs torch.distributed to be initialised first"
            )
        return ParallelState()
    world, rank = dist.get_world_size(), dist.get_rank()
    grid = rank_grid(world, tp_size, pp_size)  # grid[p][dc][t], dc = dp_rank * cp + cp_rank
    if cp_size <= 0 or len(grid[0]) % cp_size:
        raise ValueError(f"world size {world} is not divisible by tp {tp_size} x pp {pp_size} x cp {cp_size}")
    if cp_size > 1 and ep_size > 1:
        raise ValueError("context parallelism does not combine with expert parallelism yet")
    dp_size = len(grid[0]) // cp_size
    ep_groups, edp_groups = expert_rank_groups(world, tp_size, pp_size, ep_size)
    mine: dict[str, Any] = {}

    def make(ranks: list[int], key: str) -> None:
        group = dist.new_group(ranks)  # size-1 groups too: DeepSpeed and collectives expect real groups
        if rank in ranks:
            mine[key] = group

    for p in range(pp_size):
        for dc in range(dp_size * cp_size):
            make(grid[p][dc], "tp")
    for p in range(pp_size):
        for t in range(tp_size):
            for c in range(cp_size):
                make([grid[p][d * cp_size + c][t] for d in range(dp_size)], "dp")
            if cp_size > 1:
                make([grid[p][dc][t] for dc in range(dp_size * cp_size)], "dp_cp")
                for d in range(dp_size):
                    make([grid[p][d * cp_size + c][t] for c in range(cp_size)], "cp")
    for dc in range(dp_size * cp_size):
        for t in range(tp_size):
            make([grid[p][dc][t] for p in range(pp_size)], "pp")
    if ep_size > 1:  # with one expert-parallel rank the groups are this rank alone and the data-parallel group
        for ranks in ep_groups:
            make(ranks, "ep")
        for ranks in edp_groups:
            make(ranks, "edp")
    pp_rank, rem = divmod(rank, dp_size * cp_size * tp_size)
    dc_rank, tp_rank = divmod(rem, tp_size)
    dp_rank, cp_rank = divmod(dc_rank, cp_size)
    return ParallelState(
        tp_size=tp_size,
        tp_rank=tp_rank,
        tp_group=mine.get("tp"),
        pp_size=pp_size,
        pp_rank=pp_rank,
        pp_group=mine.get("pp"),
        dp_size=dp_size,
        dp_rank=dp_rank,
        dp_group=mine.get("dp"),
        ep_size=ep_size,
        ep_rank=dp_rank % ep_size,
        ep_group=mine.get("ep"),
        edp_group=mine.get("edp", mine.get("dp_cp", mine.get("dp"))),
        cp_size=cp_size,
        cp_rank=cp_rank,
        cp_group=mine.get("cp"),
        dp_cp_group=mine.get("dp_cp"),
    )
