"""Process-group start-up from the launcher's environment (deepspeed, torchrun, or none): the one place that
reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, picks the device and backend and starts the default group."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_glm.errors import ConfigError


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place in the job, as the launcher announced it."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def find_free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_world_size() -> int:
    """World size announced by the launcher (1 when started with plain ``python``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The GPU of the process with ``local_rank``: ``cuda:LOCAL_RANK``, as DeepSpeed (``set_device(local_rank)``)
    and ``PipelineModule`` (``.to(cuda:LOCAL_RANK)``) take it; more processes than visible GPUs is an error."""
    if not 0 <= local_rank < device_count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"LOCAL_RANK {local_rank} has no GPU: {device_count} visible"
            f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; start one process per GPU "
            f"(e.g. torchrun --nproc-per-node {device_count})"
        )
    return local_rank


def launcher_log(message: str) -> None:
    """Print on global rank 0 as announced by the launcher (before the process group starts)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message)


def start_process_group(
    local_rank_flag: int = -1, *, timeout_minutes: int = 30, single_process_group: bool = True
) -> DistributedEnv:
    """Device ``cuda:LOCAL_RANK`` (:func:`cuda_device_index`) with NCCL, else CPU with gloo; start the default
    process group (``timeout_minutes``: the timeout of its collectives).

    Without a launcher (world size 1) a private one-process group is started when ``single_process_group``
    (training needs one), and none otherwise. ``local_rank_flag``: the ``--local_rank`` a launcher may pass.
    """
    world = launcher_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag if local_rank_flag >= 0 else 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(cuda_device_index(local_rank, torch.cuda.device_count()))
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by checkpoints): no GPU warning
    if world == 1 and not single_process_group:
        return DistributedEnv(rank=0, world_size=1, local_rank=local_rank, device=device, backend=backend)
    if "MASTER_ADDR" not in os.environ:  # plain `python`: a private one-process group
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return DistributedEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)
