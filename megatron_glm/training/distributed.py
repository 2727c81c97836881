"""Process-group start-up for training, from the launcher's environment (deepspeed, torchrun, or none)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_glm.parallel import ParallelState
from megatron_glm.testing.distributed import find_free_port


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launcher_world_size() -> int:
    """World size announced by the launcher (1 when started with plain ``python``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(local_rank_flag: int = -1, timeout_minutes: int = 30) -> DistributedEnv:
    """Start the default process group: NCCL on CUDA, gloo on CPU; a 1-process group without a launcher."""
    world = launcher_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag if local_rank_flag >= 0 else 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if "MASTER_ADDR" not in os.environ:  # plain `python pretrain_glm.py`: a private one-process group
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "unable to detect a GPU" warning
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)  # wraps the existing group for DeepSpeed's comm layer
    return DistributedEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


class DeepSpeedMPU:
    """The model-parallel-unit interface DeepSpeed expects, backed by our :class:`ParallelState`.

    DeepSpeed's "model parallel" group is our tensor-parallel group (gradient-norm reduction, ZeRO);
    its data-parallel group is ours. Needs a state built by ``initialize_parallel_state`` (real groups).
    """

    def __init__(self, ps: ParallelState) -> None:
        if ps.tp_group is None or ps.dp_group is None:
            raise ValueError("DeepSpeedMPU needs process groups: build the state with initialize_parallel_state")
        self.ps = ps

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
        return self.ps.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ps.dp_size

    def get_data_parallel_group(self) -> object:
        return self.ps.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.pp_size

    def get_pipeline_model_parallel_group(self) -> object:
        return self.ps.pp_group
