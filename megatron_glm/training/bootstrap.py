"""The start-up and wind-down every training entry point shares (``pretrain``, ``finetune``).

In order: :func:`start_run` (the launcher lifeline, deterministic kernels, the process group, the parallel
state, the CPU allocator), :func:`open_save_dir` (``--save`` checked, locked for this run, its ``config.yaml``), the
model (:func:`~megatron_glm.training.setup.build_model`, loaded without a random init when it starts from a
checkpoint's weights), :func:`new_trainer` (the batches, the compute peak, metrics, checkpoints) and
:func:`train_and_finish` (the set-up line, training, the group ended, the lock released, the allocator restored).
An entry point adds only what is its own: its config, data, loss and identity.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import yaml

from megatron_glm.checkpoint import CheckpointManager, check_save_dir
from megatron_glm.checkpoint.manager import lock_save_dir, write_text_atomic
from megatron_glm.config import GLMConfig
from megatron_glm.dtypes import DTYPES
from megatron_glm.errors import CheckpointError
from megatron_glm.locking import DirLock
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.launch import DistributedEnv
from megatron_glm.training.cpu_allocator import cpu_allocator
from megatron_glm.training.determinism import apply_determinism
from megatron_glm.training.distributed import finish_distributed, init_distributed
from megatron_glm.training.heartbeat import Heartbeat
from megatron_glm.training.lifeline import die_with_parent, launched_by_launcher
from megatron_glm.training.metrics import MetricsLogger
from megatron_glm.training.pipeline import TrainingModel
from megatron_glm.training.throughput import device_peak_flops
from megatron_glm.training.trainer import Trainer, TrainState

T = TypeVar("T", bound=Trainer)


@dataclasses.dataclass
class RunStart:
    """A started run: its process group, parallel state and console (rank 0 prints)."""

    env: DistributedEnv
    heartbeat: Heartbeat | None
    ps: ParallelState
    log: Callable[[str], None]
    started: float
    save_lock: DirLock | None = None
    restore_allocator: Callable[[], None] | None = None

    @property
    def is_logger(self) -> bool:
        return self.env.rank == 0

    @property
    def device(self) -> torch.device:
        return self.env.device


def start_run(cfg: GLMConfig, started: float) -> RunStart:
    """The process group and parallel state of a validated ``cfg`` (``started``: the run's clock start)."""
    if launched_by_launcher():
        die_with_parent()  # a killed launcher takes its workers down (no orphans writing checkpoints)
    t, p = cfg.training, cfg.parallel
    apply_determinism(t.deterministic)  # before CUDA starts (cuBLAS reads its workspace setting once)
    env, heartbeat = init_distributed(t.local_rank, t.distributed_timeout_minutes, t.heartbeat_timeout)
    ps = initialize_parallel_state(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_parallel_size, p.context_parallel_size
    )
    log = print if env.rank == 0 else (lambda *_: None)
    line, restore = cpu_allocator(t.cpu_allocator, env.device)
    if line:
        log(line)
    return RunStart(env=env, heartbeat=heartbeat, ps=ps, log=log, started=started, restore_allocator=restore)


def open_save_dir(run: RunStart, cfg: GLMConfig, doc: dict[str, Any]) -> None:
    """``--save`` (when set) checked by every rank (a read-only or full directory is reported by all, at once),
    locked for this run (another is refused, naming the holder) and given ``config.yaml`` (``doc``) by rank 0."""
    if not cfg.checkpoint.save:
        return
    save_dir = check_save_dir(cfg.checkpoint.save)
    run.save_lock = lock_save_dir(save_dir, run.log)
    if run.is_logger:
        try:
            write_text_atomic(save_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))
        except OSError as exc:
            raise CheckpointError(f"--save {save_dir}: cannot write config.yaml ({exc.strerror or exc})") from None


def trainer_services(cfg: GLMConfig, device: torch.device, is_logger: bool, log: Callable[[str], None]) -> dict:
    """The trainer's keyword arguments that every entry point builds alike: the compute peak (``logging.peak_tflops``
    per device, else the device's datasheet peak or a matmul measured on it: :func:`device_peak_flops`; summed
    over ranks), the metrics logger, the checkpoint manager and the log function."""
    per_device, source = device_peak_flops(DTYPES[cfg.training.precision], device, cfg.logging.peak_tflops)
    log(f"MFU peak: {per_device / 1e12:.4g} TFLOP/s per device in {cfg.training.precision} ({source})")
    peak = torch.tensor([per_device], dtype=torch.float64, device=device)  # on the device: NCCL needs it
    dist.all_reduce(peak)
    return {
        "peak_flops": float(peak.item()),
        "checkpoints": CheckpointManager(cfg.checkpoint.save, cfg.checkpoint.keep_last, log=log),
        "logger": MetricsLogger(cfg.checkpoint.save, cfg.logging.tensorboard_dir, enabled=is_logger),
        "log": log,
    }


def batch_streams(
    make: Callable[..., Iterator[dict[str, torch.Tensor]]],
    train: Any,
    valid: Any | None,
    run: RunStart,
    micro_batch_size: int,
    **train_options: Any,
) -> dict[str, Any]:
    """The trainer's ``train_batches`` / ``valid_batches``: this rank's micro-batches of ``train`` (resumed at a
    consumed-sample count) and ``valid`` (from its start; ``None`` without one), each ``make(dataset,
    consumed_samples=, micro_batch_size=, dp_rank=, dp_size=, pin_memory=, **options)``. Page-locked on CUDA:
    the trainer's non-blocking copies then really overlap."""
    shard = dict(
        micro_batch_size=micro_batch_size,
        dp_rank=run.ps.dp_rank,
        dp_size=run.ps.dp_size,
        pin_memory=run.device.type == "cuda",
    )

    def train_batches(consumed: int) -> Iterator[dict[str, torch.Tensor]]:
        return make(train, consumed_samples=consumed, **shard, **train_options)

    def valid_batches() -> Iterator[dict[str, torch.Tensor]]:
        return make(valid, consumed_samples=0, **shard)

    return {"train_batches": train_batches, "valid_batches": valid_batches if valid is not None else None}


def new_trainer(
    cls: type[T],
    cfg: GLMConfig,
    run: RunStart,
    engine: Any,
    built: TrainingModel,
    *,
    streams: dict[str, Any],
    accumulation_steps: int,
    global_batch_size: int,
    flops_per_sample: float,
    pipeline_loss: Any = None,
    **extra: Any,
) -> T:
    """``cls`` (:class:`Trainer` or a subclass, whose own keywords are ``extra``) for this run."""
    return cls(
        cfg,
        run.ps,
        engine,
        run.device,
        rng_tracker=built.rng_tracker,
        pipeline_loss=pipeline_loss,
        accumulation_steps=accumulation_steps,
        global_batch_size=global_batch_size,
        flops_per_sample=flops_per_sample,
        started=run.started,
        **streams,
        **trainer_services(cfg, run.device, run.is_logger, run.log),
        **extra,
    )


def train_and_finish(
    run: RunStart, trainer: Trainer, unit: str, then: Callable[[TrainState], None] | None = None
) -> TrainState:
    """Train (``then(state)`` after the last step), then end the run cleanly: metrics closed, every rank met,
    the process group ended, ``--save`` unlocked. ``unit``: what a sample is (``samples``, ``examples``)."""
    ps, t = run.ps, trainer.cfg.training
    run.log(
        f"set-up took {time.perf_counter() - run.started:.1f} s; training {t.train_iters} steps of "
        f"{trainer.global_batch} {unit} (micro-batch {t.micro_batch_size} x accumulation {trainer.accum} x dp "
        f"{ps.dp_size})" + (f"; each sequence split over cp {ps.cp_size}" if ps.cp_size > 1 else "")
    )
    state = trainer.train()
    if then is not None:
        then(state)
    trainer.logger.close()
    run.log(f"done: step {state.step}, {state.consumed_samples} {unit}, {time.perf_counter() - run.started:.1f} s")
    finish_distributed(run.heartbeat)
    if run.save_lock is not None:
        run.save_lock.release()
    if run.restore_allocator is not None:
        run.restore_allocator()
    return state
