"""An in-process training run for multi-rank tests: the real set-up (``build_model``/``build_engine``) and the
real :class:`Trainer`, fed synthetic GLM batches, its logged values captured instead of written."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from megatron_glm.batch import Batch
from megatron_glm.checkpoint import CheckpointManager
from megatron_glm.config import GLMConfig, build_config
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.training.distributed import init_distributed
from megatron_glm.training.metrics import MetricsLogger
from megatron_glm.training.setup import build_engine, build_model
from megatron_glm.training.trainer import Trainer

VOCAB, SEQ = 128, 32


class CapturingLogger(MetricsLogger):
    """Keeps every logged ``(step, values)`` in memory."""

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.rows: list[tuple[int, dict[str, Any]]] = []

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        self.rows.append((step, dict(values, prefix=prefix)))


def tiny_config(**assignments: Any) -> GLMConfig:
    """glm-tiny, fp32, no dropout, a vocabulary of :data:`VOCAB`, ``SEQ``-token samples."""
    base = {
        "model.size": "glm-tiny",
        "model.vocab_size": VOCAB,
        "model.hidden_dropout": 0.0,
        "model.attention_dropout": 0.0,
        "data.seq_length": SEQ,
        "optimizer.lr": 1e-3,
        "logging.log_interval": 1,
    }
    return build_config({**base, **assignments})


def synthetic_batches(micro_batch_size: int, dp_rank: int, seed: int = 0, skip: int = 0) -> Iterator[Batch]:
    """Endless GLM-shaped micro-batches (every objective present), different per data-parallel rank; the first
    ``skip`` are drawn and dropped (a resumed run continues the stream)."""
    g = torch.Generator().manual_seed(seed * 1000 + dp_rank)
    b, s = micro_batch_size, SEQ
    while True:
        ids = torch.randint(0, VOCAB, (b, s), generator=g)
        sep = torch.randint(s // 4, s // 2, (b,), generator=g)
        loss_mask = (torch.arange(s).expand(b, s) >= sep[:, None]).float()
        if skip > 0:
            skip -= 1
            continue
        yield {
            "input_ids": ids,
            "labels": torch.roll(ids, -1, dims=1),
            "loss_mask": loss_mask,
            "position_ids": torch.arange(s).expand(b, 2, s).clone(),
            "sep": sep,
            "objective": torch.arange(b) % 3,
        }


def build_trainer(cfg: GLMConfig) -> tuple[Trainer, ParallelState, CapturingLogger]:
    """The real set-up of ``pretrain`` (no data files; checkpoints in ``checkpoint.save`` when set) on the launched
    process group."""
    env, _ = init_distributed()  # no heartbeat
    p = cfg.parallel
    ps = initialize_parallel_state(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_parallel_size, p.context_parallel_size
    )
    built = build_model(cfg, ps, env.device)
    engine, accum, global_batch = build_engine(cfg, ps, built.module)
    logger = CapturingLogger()
    mbs = cfg.training.micro_batch_size
    trainer = Trainer(
        cfg,
        ps,
        engine,
        env.device,
        rng_tracker=built.rng_tracker,
        pipeline_loss=built.loss,
        train_batches=lambda consumed: synthetic_batches(mbs, ps.dp_rank, skip=consumed // (mbs * ps.dp_size)),
        valid_batches=None,
        accumulation_steps=accum,
        global_batch_size=global_batch,
        flops_per_sample=1.0,
        peak_flops=0.0,
        checkpoints=CheckpointManager(cfg.checkpoint.save, log=lambda _m: None),
        logger=logger,
        log=lambda _m: None,
    )
    return trainer, ps, logger
