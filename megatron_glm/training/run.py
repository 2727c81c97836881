"""``pretrain(cfg)``: everything ``pretrain_glm.py`` does, as a library call."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import yaml

from megatron_glm.checkpoint import CheckpointManager, check_save_dir
from megatron_glm.checkpoint.architecture import adopt_checkpoint_architecture
from megatron_glm.checkpoint.manager import lock_save_dir, write_text_atomic
from megatron_glm.checkpoint.weights import load_model_weights
from megatron_glm.config import GLMConfig, config_to_dict, validate
from megatron_glm.config.validate import local_device_type
from megatron_glm.data.loader import build_data_iterator, build_pretraining_datasets
from megatron_glm.data.tokenizer import open_tokenizer
from megatron_glm.dtypes import DTYPES
from megatron_glm.errors import CheckpointError, ConfigError
from megatron_glm.model import flops_per_token
from megatron_glm.parallel import initialize_parallel_state
from megatron_glm.parallel.launch import launcher_log, launcher_world_size
from megatron_glm.training.determinism import apply_determinism
from megatron_glm.training.distributed import finish_distributed, init_distributed
from megatron_glm.training.drift import run_identity
from megatron_glm.training.lifeline import die_with_parent, launched_by_launcher
from megatron_glm.training.metrics import MetricsLogger
from megatron_glm.training.rng import seed_everything
from megatron_glm.training.setup import build_engine, build_model, load_lora_base, resolve_vocab_size
from megatron_glm.training.throughput import device_peak_flops
from megatron_glm.training.trainer import Trainer, TrainState


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


def pretrain(cfg: GLMConfig) -> TrainState:
    """Train as configured; returns the final state. Launch one process per device (deepspeed/torchrun)."""
    if not cfg.data.data_path:
        raise ConfigError("data.data_path is empty: pass --data-path PREFIX (see tools/preprocess_data.py)")
    if not cfg.data.tokenizer_model:
        raise ConfigError("data.tokenizer_model is empty: pass --tokenizer-model PATH.model")
    if launched_by_launcher():
        die_with_parent()  # a killed launcher takes its workers down (no orphans writing checkpoints)
    cfg = adopt_checkpoint_architecture(cfg, launcher_log)  # resuming or loading weights: its architecture
    validate(cfg, launcher_world_size(), local_device_type())  # once, before any process group starts
    t = cfg.training
    apply_determinism(t.deterministic)  # before CUDA starts (cuBLAS reads its workspace setting once)
    env, heartbeat = init_distributed(t.local_rank, t.distributed_timeout_minutes, t.heartbeat_timeout)
    is_logger = env.rank == 0
    log = print if is_logger else (lambda *_: None)
    started = time.perf_counter()
    p = cfg.parallel
    ps = initialize_parallel_state(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    tokenizer = open_tokenizer(cfg.data.tokenizer_model)
    cfg = resolve_vocab_size(cfg, tokenizer.vocab_size)
    seed_everything(cfg.training.seed, ps.pp_rank)
    log(
        f"megatron_glm: world {env.world_size} = tp {ps.tp_size} x pp {ps.pp_size} x dp {ps.dp_size} on "
        f"{env.device.type}; {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab "
        f"{cfg.model.vocab_size} (tokenizer {tokenizer.vocab_size}), seq {cfg.data.seq_length}, "
        f"precision {cfg.training.precision}"
        f"{', deterministic kernels' if torch.are_deterministic_algorithms_enabled() else ''}"
    )
    save_lock = None
    if cfg.checkpoint.save:  # every rank: a read-only or full save directory is reported by all, at once
        save_dir = check_save_dir(cfg.checkpoint.save)
        save_lock = lock_save_dir(save_dir, log)  # one run per --save: another is refused, naming the holder
        if is_logger:
            try:
                write_text_atomic(save_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            except OSError as exc:
                raise CheckpointError(f"--save {save_dir}: cannot write config.yaml ({exc.strerror or exc})") from None

    # Data first: a missing or corrupt dataset is reported before minutes of model and engine set-up.
    train_ds, valid_ds, _ = build_pretraining_datasets(
        cfg, tokenizer, dp_size=ps.dp_size, is_rank0=is_logger, barrier=dist.barrier, log=log
    )
    built = build_model(cfg, ps, env.device)
    model = built.module
    lora = load_lora_base(model, cfg, ps, cfg.lora.base, log)  # LoRA: the frozen base ({} without)
    if cfg.checkpoint.load and cfg.checkpoint.load_weights_only:
        loaded = load_model_weights(model, cfg.checkpoint.load, ps.tp_size, ps.tp_rank)
        log(f"loaded model weights only from {loaded}; optimizer and schedule start fresh")
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: before partitioning
    log(f"parameters on this rank: {n_params / 1e6:.2f} M")
    engine, accum, global_batch = build_engine(cfg, ps, model)

    mbs = cfg.training.micro_batch_size
    pinned = env.device.type == "cuda"  # page-locked batches: the trainer's non_blocking copies really overlap

    def train_batches(consumed: int):
        return build_data_iterator(
            train_ds,
            consumed_samples=consumed,
            micro_batch_size=mbs,
            dp_rank=ps.dp_rank,
            dp_size=ps.dp_size,
            num_workers=cfg.data.num_workers,
            pin_memory=pinned,
        )

    def valid_batches():
        return build_data_iterator(
            valid_ds,
            consumed_samples=0,
            micro_batch_size=mbs,
            dp_rank=ps.dp_rank,
            dp_size=ps.dp_size,
            num_workers=0,
            pin_memory=pinned,
        )

    dist.barrier()
    flops_sample = flops_per_token(dataclasses.replace(cfg.model), cfg.data.seq_length) * cfg.data.seq_length
    services = trainer_services(cfg, env.device, is_logger, log)
    trainer = Trainer(
        cfg,
        ps,
        engine,
        env.device,
        rng_tracker=built.rng_tracker,
        pipeline_loss=built.loss,
        train_batches=train_batches,
        valid_batches=valid_batches if valid_ds is not None else None,
        accumulation_steps=accum,
        global_batch_size=global_batch,
        flops_per_sample=flops_sample,
        started=started,
        **services,
    )
    trainer.identity = run_identity(cfg, global_batch)
    trainer.lora = lora
    if cfg.checkpoint.load and not cfg.checkpoint.load_weights_only:
        trainer.resume(cfg.checkpoint.load)
    log(
        f"set-up took {time.perf_counter() - started:.1f} s; training {cfg.training.train_iters} steps of "
        f"{global_batch} samples (micro-batch {mbs} x accumulation {accum} x dp {ps.dp_size})"
    )
    state = trainer.train()
    services["logger"].close()
    log(f"done: step {state.step}, {state.consumed_samples} samples, {time.perf_counter() - started:.1f} s")
    finish_distributed(heartbeat)
    if save_lock is not None:
        save_lock.release()
    return state
