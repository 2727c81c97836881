"""The parts of a GLM layer that run on a sequence shard under sequence parallelism.

LayerNorms see one shard of the sequence, so their parameters get a partial gradient on each tensor-parallel
rank: they go through ``copy_to_tensor_parallel_region`` (gradient all-reduced). Dropout on a shard draws
from the tracker's tensor-parallel stream, so the shards get different masks.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.parallel import MODEL_PARALLEL_RNG, RNGStatesTracker, copy_to_tensor_parallel_region


def layer_norm(ln: nn.LayerNorm | nn.RMSNorm, x: torch.Tensor, group: Any, sequence_parallel: bool) -> torch.Tensor:
    """``ln(x)`` (LayerNorm or RMSNorm); on a sequence shard its weight and bias gradients are summed over
    ``group``."""
    if not sequence_parallel:
        return ln(x)
    if isinstance(ln, nn.RMSNorm):
        return F.rms_norm(x, ln.normalized_shape, copy_to_tensor_parallel_region(ln.weight, group), ln.eps)
    return F.layer_norm(
        x,
        ln.normalized_shape,
        copy_to_tensor_parallel_region(ln.weight, group),
        copy_to_tensor_parallel_region(ln.bias, group),
        ln.eps,
    )


def dropout(
    drop: nn.Dropout, x: torch.Tensor, tracker: RNGStatesTracker | None, sequence_parallel: bool
) -> torch.Tensor:
    """``drop(x)``; on a sequence shard drawn from the tracker's tensor-parallel stream."""
    active = sequence_parallel and tracker is not None and drop.training and drop.p > 0
    with tracker.fork(MODEL_PARALLEL_RNG) if active else contextlib.nullcontext():
        return drop(x)
