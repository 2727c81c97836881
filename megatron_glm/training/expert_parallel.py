"""Expert parameters under DeepSpeed: gradients reduced over the expert-data-parallel group, not the whole
data-parallel group.

DeepSpeed 0.19 treats a parameter as an expert parameter when ``param.allreduce`` is ``False``; its
``param.group_name`` keys the expert-data-parallel group in ``deepspeed.utils.groups`` that reduces it (ZeRO-0's
bucketed all-reduce, and ZeRO-1/2's reduce-scatter, which also partitions the expert optimizer groups over that
group). Expert gradients are still divided by the whole data-parallel size: a rank's expert gradient already
sums the tokens of its whole expert-parallel group (the all-to-all's backward), so the sum over the
expert-data-parallel group covers every data-parallel rank's tokens once.

The engine turns that machinery on only when the model holds a module of DeepSpeed's ``MoE`` class; an
:class:`ExpertParallelMarker` (no parameters, never called) is that module. The groups are ours
(:class:`~megatron_glm.parallel.ParallelState`, registered under DeepSpeed's name ``ep_size_<ep>``), so DeepSpeed
creates none. The marker declares no local experts: DeepSpeed's per-expert checkpoint files assume its own
``MoE`` module layout, so our checkpoint manager stores the expert shards instead. ZeRO-3 with expert
parallelism is refused (DeepSpeed 0.19 refuses native MoE under stage 3), and so is ZeRO-0 (:func:`check_zero_stage`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.errors import ConfigError
from megatron_glm.parallel import ParallelState

MARKER = "deepspeed_expert_parallel"


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of ``ep_size`` (``deepspeed.moe.layer.MoE``'s)."""
    return f"ep_size_{ep_size}"


def check_zero_stage(parallel_state: ParallelState, stage: int, source: str) -> None:
    """Expert parallelism runs under ZeRO-1/2 only: DeepSpeed 0.19 refuses MoE under ZeRO-3, and its ZeRO-0
    gradient clipping averages each rank's norm over the data-parallel ranks instead of taking the global norm
    (ranks hold different experts), so clipped steps would differ from EP = 1."""
    if parallel_state.ep_size > 1 and stage in (0, 3):
        raise ConfigError(
            f"{source}: ZeRO stage {stage} cannot be used with expert parallelism (expert_parallel_size "
            f"{parallel_state.ep_size}); use ZeRO stage 1 or 2"
        )


def mark_expert_parameters(
    model: torch.nn.Module, is_expert: Callable[[str], bool], parallel_state: ParallelState
) -> list[str]:
    """Mark the parameters named ``is_expert`` as DeepSpeed expert parameters of our expert groups; return their
    names. Nothing is marked with one expert-parallel rank (their reduction group is the data-parallel one)."""
    if parallel_state.ep_size == 1:
        return []
    ps, group = parallel_state, expert_group_name(parallel_state.ep_size)
    names = []
    for name, p in model.named_parameters():
        if is_expert(name):
            p.allreduce = False
            p.group_name = group
            p.expert_shard = (ps.pp_rank, ps.tp_rank, ps.ep_rank, ps.edp_rank)  # its checkpoint file's
            names.append(name)
    return names


def register_expert_groups(parallel_state: ParallelState) -> None:
    """Put this rank's expert-parallel and expert-data-parallel groups in ``deepspeed.utils.groups``."""
    from deepspeed.utils import groups

    ps, name = parallel_state, expert_group_name(parallel_state.ep_size)
    if ps.ep_group is None or ps.edp_group is None:
        raise ValueError("expert parallelism needs the groups of initialize_parallel_state")
    groups._EXPERT_PARALLEL_GROUP[name] = ps.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ps.ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = ps.edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ps.edp_group)


def _marker_class() -> type:
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Tells DeepSpeed's engine the model has expert parameters (module docstring); holds nothing."""

        def __init__(self, num_experts: int, ep_size: int) -> None:
            torch.nn.Module.__init__(self)  # not MoE's: no gate, no experts
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = 0  # DeepSpeed writes and reads no per-expert files of its own
            self.expert_group_name = expert_group_name(ep_size)
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The groups are ours, registered before the engine starts: DeepSpeed creates none."""

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallelMarker


def prepare_expert_parallel(
    model: torch.nn.Module,
    param_groups: list[dict[str, Any]],
    is_expert: Callable[[str], bool],
    parallel_state: ParallelState,
    num_experts: int,
) -> list[dict[str, Any]]:
    """Before ``deepspeed.initialize``: mark ``model``'s expert parameters, register our groups, attach the
    marker, and return the optimizer groups split into dense and expert groups (DeepSpeed's split; every group
    needs a ``name``). With one expert-parallel rank, ``param_groups`` unchanged; with several, a model (a pipeline
    stage) without expert parameters is refused (one line)."""
    if parallel_state.ep_size == 1:
        return param_groups
    if not mark_expert_parameters(model, is_expert, parallel_state):  # DeepSpeed's MoE engine needs an expert group
        raise ConfigError(
            f"expert_parallel_size {parallel_state.ep_size}: pipeline stage {parallel_state.pp_rank} holds no "
            "expert (MoE) layer; with expert parallelism every stage needs one (fewer stages or more layers)"
        )
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    register_expert_groups(parallel_state)
    model.add_module(MARKER, _marker_class()(num_experts, parallel_state.ep_size))
    named = [dict(g, name=g.get("name", f"group{i}")) for i, g in enumerate(param_groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]
