"""``pretrain(cfg)``: everything ``pretrain_glm.py`` does, as a library call (the start-up and wind-down it shares
with fine-tuning: :mod:`megatron_glm.training.bootstrap`)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_glm.checkpoint.architecture import adopt_checkpoint_architecture
from megatron_glm.checkpoint.manager import list_checkpoints
from megatron_glm.config import GLMConfig, config_to_dict, validate
from megatron_glm.config.validate import local_device_type
from megatron_glm.data.loader import build_data_iterator, build_pretraining_datasets
from megatron_glm.data.tokenizer import open_tokenizer
from megatron_glm.errors import ConfigError
from megatron_glm.model import flops_per_token
from megatron_glm.parallel.launch import launcher_log, launcher_world_size
from megatron_glm.training.bootstrap import (
    batch_streams,
    new_trainer,
    open_save_dir,
    start_run,
    train_and_finish,
    trainer_services,
)
from megatron_glm.training.drift import run_identity
from megatron_glm.training.rng import seed_everything
from megatron_glm.training.setup import build_engine, build_model, load_lora_base, resolve_vocab_size
from megatron_glm.training.trainer import Trainer, TrainState

__all__ = ["pretrain", "trainer_services"]  # trainer_services: where callers found it before the bootstrap


def pretrain(cfg: GLMConfig) -> TrainState:
    """Train as configured; returns the final state. Launch one process per device (deepspeed/torchrun)."""
    if not cfg.data.data_path:
        raise ConfigError("data.data_path is empty: pass --data-path PREFIX (see tools/preprocess_data.py)")
    if not cfg.data.tokenizer_model:
        raise ConfigError("data.tokenizer_model is empty: pass --tokenizer-model PATH.model")
    cfg = adopt_checkpoint_architecture(cfg, launcher_log)  # resuming, loading weights, a LoRA base: its architecture
    validate(cfg, launcher_world_size(), local_device_type())  # once, before any process group starts
    run = start_run(cfg, time.perf_counter())
    ps, log = run.ps, run.log
    tokenizer = open_tokenizer(cfg.data.tokenizer_model)
    cfg = resolve_vocab_size(cfg, tokenizer.vocab_size)
    seed_everything(cfg.training.seed, ps.pp_rank)
    log(
        f"megatron_glm: world {run.env.world_size} = tp {ps.tp_size} x pp {ps.pp_size} x dp {ps.dp_size} on "
        f"{run.device.type}; {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab "
        f"{cfg.model.vocab_size} (tokenizer {tokenizer.vocab_size}), seq {cfg.data.seq_length}, "
        f"precision {cfg.training.precision}"
        f"{', deterministic kernels' if torch.are_deterministic_algorithms_enabled() else ''}"
    )
    open_save_dir(run, cfg, config_to_dict(cfg))

    # Data first: a missing or corrupt dataset is reported before minutes of model and engine set-up.
    train_ds, valid_ds, _ = build_pretraining_datasets(
        cfg, tokenizer, dp_size=ps.dp_size, is_rank0=run.is_logger, barrier=dist.barrier, log=log
    )
    weights = cfg.checkpoint.load if cfg.checkpoint.load_weights_only else ""
    resuming = bool(cfg.checkpoint.load and not weights and list_checkpoints(cfg.checkpoint.load))
    built = build_model(cfg, ps, run.device, weights=weights or None, resume=resuming, log=log)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in built.module.parameters())  # ZeRO-3: before partitioning
    lora = load_lora_base(built.module, cfg, ps, cfg.lora.base, log)  # LoRA: the frozen base ({} without)
    log(f"parameters on this rank: {n_params / 1e6:.2f} M")
    engine, accum, global_batch = build_engine(cfg, ps, built.module)
    streams = batch_streams(
        build_data_iterator, train_ds, valid_ds, run, cfg.training.micro_batch_size, num_workers=cfg.data.num_workers
    )
    dist.barrier()
    trainer = new_trainer(
        Trainer,
        cfg,
        run,
        engine,
        built,
        streams=streams,
        pipeline_loss=built.loss,
        accumulation_steps=accum,
        global_batch_size=global_batch,
        flops_per_sample=flops_per_token(cfg.model, cfg.data.seq_length) * cfg.data.seq_length,
    )
    trainer.identity = run_identity(cfg, global_batch)
    trainer.lora = lora
    if resuming:  # (a directory without checkpoints: a fresh start, the model's random init drawn)
        trainer.resume(cfg.checkpoint.load)
    return train_and_finish(run, trainer, "samples")
