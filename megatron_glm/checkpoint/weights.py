"""Start a run from a checkpoint's model weights only (``checkpoint.load_weights_only``).

Used for checkpoints written without optimizer state (converted from ZeRO-3, from a pipeline layout, or from
another format) and for fine-tuning. Any readable checkpoint works whatever its tensor/pipeline layout: it
is read as full tensors by original GLM name and this rank keeps its shard. The weights are loaded before
the DeepSpeed engine is built, so every ZeRO stage works; optimizer, schedule, step and data position start
fresh.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from megatron_glm.checkpoint.experts import expert_slice
from megatron_glm.checkpoint.reshard import split_full
from megatron_glm.checkpoint.stream import ModelSource
from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError
from megatron_glm.model.glm import GLMModel, new_rng_tracker
from megatron_glm.model.layout import ModelLayout, original_name
from megatron_glm.model.meta_device import materialize, writable
from megatron_glm.parallel import ParallelState
from megatron_glm.parallel.lora import is_lora_name

__all__ = ["load_glm_model", "load_model_weights", "materialize", "writable"]


def load_model_weights(
    model: nn.Module,
    source: str | Path | ModelSource,
    tp_size: int,
    tp_rank: int,
    ep: tuple[int, int] = (1, 0),
) -> str:
    """Load this rank's shard of every parameter of ``model`` from a checkpoint path (any format and layout)
    or an already opened source (``megatron_glm.checkpoint.formats.registry.open_source``); ``ep``: the
    expert-parallel ``(size, rank)`` (expert tensors keep this rank's experts)."""
    from megatron_glm.checkpoint.formats.registry import open_source  # the formats import the model; keep this lazy

    src = open_source(source) if isinstance(source, (str, Path)) else source
    available, layout = set(src.names()), src.info.layout
    with torch.no_grad():
        for local, param in model.named_parameters():
            name = original_name(local)
            if is_lora_name(name):  # LoRA adapters keep their initialisation (or come from the run's checkpoint)
                continue
            if name not in available:
                raise CheckpointError(f"{src.info.path}: has no tensor {name} (needed by this model)")
            with writable(param):
                _load_one(src, layout, name, param, tp_rank, tp_size, ep)
    src.release()
    return src.info.path


def load_glm_model(
    config: ModelConfig,
    source: str | Path | ModelSource,
    parallel_state: ParallelState,
    *,
    seed: int,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[GLMModel, str]:
    """``(model, checkpoint path)``: a :class:`GLMModel` with this rank's shards of ``source``'s weights, built
    on the meta device and then loaded (no random init drawn; the values are the checkpoint's, bit for bit).
    ``seed`` seeds its tensor-parallel dropout stream as :class:`GLMModel` would."""
    ps = parallel_state
    model = materialize(GLMModel(config, ps, seed=seed, params_dtype=params_dtype, device="meta"), device)
    model.rng_tracker = new_rng_tracker(seed, ps, device)
    return model, load_model_weights(model, source, ps.tp_size, ps.tp_rank, (ps.ep_size, ps.ep_rank))


def _load_one(
    src: ModelSource,
    layout: ModelLayout,
    name: str,
    param: nn.Parameter,
    tp_rank: int,
    tp_size: int,
    ep: tuple[int, int] = (1, 0),
) -> None:
    """Copy this rank's shard of checkpoint tensor ``name`` into ``param``."""
    full, spec = src.tensor(name), layout[name]
    try:
        if ep[0] > 1 and spec.expert_dim is not None:
            full = expert_slice(spec, full, ep[1], ep[0])
        value = split_full(spec, full, tp_rank, tp_size)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{src.info.path}: {name} of shape {list(full.shape)} cannot be split for "
            f"tensor-parallel size {tp_size} ({exc})"
        ) from None
    except CheckpointError as exc:
        raise CheckpointError(f"{src.info.path}: {exc}") from None
    if tuple(value.shape) != tuple(param.shape):
        raise CheckpointError(
            f"{src.info.path}: {name} has shape {list(value.shape)} for tp rank {tp_rank}, "
            f"the model expects {list(param.shape)}"
        )
    param.copy_(value)
