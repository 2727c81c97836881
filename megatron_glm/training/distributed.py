"""Distributed start-up for training (the process group, then DeepSpeed's comm layer) and DeepSpeed's MPU view
of our parallel state."""

from __future__ import annotations

import torch.distributed as dist

from megatron_glm.parallel import ParallelState
from megatron_glm.parallel.launch import DistributedEnv, start_process_group
from megatron_glm.training.heartbeat import Heartbeat, start_heartbeat


def init_distributed(
    local_rank_flag: int = -1, timeout_minutes: int = 30, heartbeat_timeout: float = 0.0
) -> tuple[DistributedEnv, Heartbeat | None]:
    """Start the default process group (a 1-process group without a launcher; ``timeout_minutes``: its
    collectives' timeout), DeepSpeed's comm layer and this rank's liveness watch (``heartbeat_timeout``
    seconds, 0: none; see :mod:`megatron_glm.training.heartbeat`). End with :func:`finish_distributed`."""
    env = start_process_group(local_rank_flag, timeout_minutes=timeout_minutes)
    import deepspeed

    deepspeed.init_distributed(dist_backend=env.backend)  # wraps the existing group for DeepSpeed's comm layer
    return env, start_heartbeat(heartbeat_timeout)


def finish_distributed(heartbeat: Heartbeat | None) -> None:
    """A clean end: stop the watch (the peers stop watching this rank), meet every rank, end the group."""
    if heartbeat is not None:
        heartbeat.stop()
    dist.barrier()
    dist.destroy_process_group()


class DeepSpeedMPU:
    """The model-parallel-unit interface DeepSpeed expects, backed by our :class:`ParallelState`.

    DeepSpeed's "model parallel" group is our tensor-parallel group (gradient-norm reduction, ZeRO);
    its data-parallel group is our gradient-reduction group: the data-parallel ranks times the context-parallel ones
    (``ParallelState.grad_dp_group``; the data-parallel group without context parallelism). Needs a state built by
    ``initialize_parallel_state`` (real groups).
    """

    def __init__(self, parallel_state: ParallelState) -> None:
        if parallel_state.tp_group is None or parallel_state.grad_dp_group is None:
            raise ValueError("DeepSpeedMPU needs process groups: build the state with initialize_parallel_state")
        self.ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self.ps.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ps.tp_size

    def get_model_parallel_group(self) -> object:
        return self.ps.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank() - self.ps.tp_rank

    def get_data_parallel_rank(self) -> int:
        return self.ps.grad_dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ps.grad_dp_size

    def get_data_parallel_group(self) -> object:
        return self.ps.grad_dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.pp_size

    def get_pipeline_model_parallel_group(self) -> object:
        return self.ps.pp_group
