"""Build a :class:`GLMModel` for inference from any checkpoint we can read.

``path`` may be a training save directory (newest complete ``global_stepN``), a ``global_stepN`` directory
(any tensor/pipeline/ZeRO layout), an original GLM checkpoint or a standalone export. It is read through the
checkpoint package as full tensors by original GLM name (weights-only loading) and every tensor-parallel
rank keeps its shard, so the inference TP size need not match the saved one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.formats.registry import open_source
from megatron_glm.checkpoint.weights import load_glm_model
from megatron_glm.errors import CheckpointError
from megatron_glm.model import GLMModel
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.launch import start_process_group


def load_model(
    path: str | os.PathLike[str],
    parallel_state: ParallelState | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[GLMModel, dict[str, Any]]:
    """``(model in eval mode, meta)`` on ``device`` with ``dtype`` parameters; dropout off.

    ``meta`` is the checkpoint's ``meta.json`` when it has one (``config`` holds the run's full config:
    tokenizer path, data, objective), else a minimal one with the model config and tokenizer files.
    Collective-free; every tensor-parallel rank calls it.
    """
    ps = parallel_state or ParallelState()
    src = open_source(Path(path))
    cfg = dataclasses.replace(src.info.config, hidden_dropout=0.0, attention_dropout=0.0, checkpoint_activations=False)
    if cfg.vocab_size % ps.tp_size:
        raise CheckpointError(f"{src.info.path}: vocab size {cfg.vocab_size} does not split over TP {ps.tp_size}")
    model, _ = load_glm_model(cfg, src, ps, seed=0, params_dtype=dtype, device=device)  # no random init drawn
    meta = dict(getattr(src.info, "meta", None) or {})
    if "config" not in meta:
        tokenizer = src.info.tokenizer_files[0] if src.info.tokenizer_files else ""
        meta["config"] = {"model": dataclasses.asdict(cfg), "data": {"tokenizer_model": tokenizer}}
    meta["step_dir"] = src.info.path
    return model.eval(), meta


def init_inference(tp_size: int | None = None) -> tuple[ParallelState, torch.device]:
    """Parallel state and device for a tool: one process, or ``torchrun --nproc_per_node N`` with TP = N
    (``tp_size``, default the world size). NCCL and ``cuda:LOCAL_RANK`` on GPUs, gloo on CPU."""
    env = start_process_group(single_process_group=False)
    if env.world_size == 1:
        return ParallelState(), env.device
    return initialize_parallel_state(tp_size=env.world_size if tp_size is None else tp_size), env.device
