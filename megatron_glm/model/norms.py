"""The norms of a GLM model: ``config.normalization`` over the hidden size (layer norms, the final norm, GLM-4's
sandwich norms) or over a head (GLM-4.5's QK-norm)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_glm.config import ModelConfig


def make_norm(
    config: ModelConfig, dtype: torch.dtype, device: torch.device | str | None, size: int = 0
) -> nn.LayerNorm | nn.RMSNorm:
    """``config.normalization`` over ``size`` (0: the hidden size): ``nn.LayerNorm`` (weight, bias) or
    ``nn.RMSNorm`` (weight), eps ``config.layernorm_epsilon``."""
    size = size or config.hidden_size
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(size, eps=config.layernorm_epsilon, dtype=dtype, device=device)
    return nn.LayerNorm(size, eps=config.layernorm_epsilon, dtype=dtype, device=device)
