"""The norms of a GLM model: ``config.normalization`` over the hidden size (layer norms, the final norm, GLM-4's
sandwich norms) or over a head (GLM-4.5's QK-norm)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.tensor_spec import TensorSpec, norm_tensors

if TYPE_CHECKING:
    from megatron_glm.model.builders import BuildContext


def make_norm(
    config: ModelConfig, dtype: torch.dtype, device: torch.device | str | None, size: int = 0
) -> nn.LayerNorm | nn.RMSNorm:
    """``config.normalization`` over ``size`` (0: the hidden size): ``nn.LayerNorm`` (weight, bias) or
    ``nn.RMSNorm`` (weight), eps ``config.layernorm_epsilon``."""
    size = size or config.hidden_size
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(size, eps=config.layernorm_epsilon, dtype=dtype, device=device)
    return nn.LayerNorm(size, eps=config.layernorm_epsilon, dtype=dtype, device=device)


class NormBuilder:
    """A layer norm slot (``input_layernorm``, the sandwich post-norms, ...): :func:`norm_tensors` over the hidden
    size, built by :func:`make_norm` (ones / zeros, as declared)."""

    def tensors(self, config: ModelConfig) -> list[TensorSpec]:
        return norm_tensors(config)

    def build(self, ctx: BuildContext) -> nn.Module:
        return make_norm(ctx.config, ctx.params_dtype, ctx.device, size=self.tensors(ctx.config)[0].shape[0])
