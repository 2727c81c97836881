"""GLM-4.5's multi-token prediction (MTP) layers (DeepSeek-V3's MTP modules), after the transformer stack.

With ``num_nextn_predict_layers = D`` the stack's final norm module (``transformer``, ``post_process``) holds ``D``
:class:`MTPLayer` under ``transformer.mtp.{k}.``. Layer ``k`` (0-based) turns the previous hidden states ``h`` (the
stack's output before the final norm for ``k = 0``, else MTP layer ``k-1``'s output before its norm) and the word
embeddings of the tokens ``k + 1`` ahead into hidden states that predict the token ``k + 2`` ahead::

    x = eh_proj(concat(enorm(E[t + k + 1]), hnorm(h[t])))     # eh_proj [H, 2H], no bias
    h' = layer(x)                                             # one decoder layer, slots of layer num_layers + k
    out = final_layernorm(h')                                 # transformers' shared_head.norm

and the shared output head turns ``out`` into logits. Its loss is the masked cross entropy
against the labels ``k + 1`` positions on (``labels[t + k + 1]``, the token ``t + k + 2``) under the loss mask
shifted the same way (the last ``k + 1`` positions have no target); the mean over the ``D`` layers, times
``mtp_loss_weight``, is the auxiliary term ``mtp`` of the loss (:func:`~megatron_glm.model.objective.mtp_loss`,
added by :func:`~megatron_glm.model.objective.with_aux`).
Embeddings of positions past the end are zeros (those rows carry no loss, and causal attention keeps them from
earlier rows). Everything is replicated over tensor-parallel ranks but the decoder layer (split as every layer);
the block runs on the whole sequence (gathered first under sequence parallelism).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.builders import layer_tensors
from megatron_glm.model.norms import make_norm
from megatron_glm.model.tensor_spec import TensorSpec, norm_tensors, relative
from megatron_glm.parallel.random import InitMethod

if TYPE_CHECKING:
    from megatron_glm.model.context import ForwardContext

MTP_PREFIX = "transformer.mtp.{}."
MTP_TERM = "mtp"
"""The name of the MTP loss among the loss's auxiliary terms."""


def mtp_tensors(config: ModelConfig, k: int = 0) -> list[TensorSpec]:
    """MTP layer ``k``'s tensors, relative to ``transformer.mtp.{k}.``, in module order: ``enorm``, ``hnorm``,
    ``eh_proj.weight [H, 2H]`` (replicated), the decoder layer under ``layer.`` (layer ``num_layers + k``'s slots),
    ``final_layernorm``."""
    h = config.hidden_size
    return [
        *norm_tensors(config, name="enorm"),
        *norm_tensors(config, name="hnorm"),
        TensorSpec("eh_proj.weight", (h, 2 * h), "weight", init="normal"),
        *relative(layer_tensors(config, config.num_layers + k), "layer."),
        *norm_tensors(config, name="final_layernorm"),
    ]


def shifted(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t [b, s, ...]`` moved ``k`` positions back along dim 1 (``out[:, i] = t[:, i + k]``), zeros at the end."""
    if k == 0:
        return t
    pad = t.new_zeros((t.shape[0], min(k, t.shape[1]), *t.shape[2:]))
    return torch.cat([t[:, k:], pad], dim=1)


class MTPLayer(nn.Module):
    """One MTP layer (module docstring): ``enorm``, ``hnorm``, ``eh_proj``, ``layer`` (a built decoder layer),
    ``final_layernorm``. ``init(name)``: the init of its tensor ``name`` (relative to the MTP layer)."""

    def __init__(
        self,
        config: ModelConfig,
        layer: nn.Module,
        *,
        init: Callable[[str], InitMethod],
        params_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        h = config.hidden_size
        self.enorm = make_norm(config, params_dtype, device)
        self.hnorm = make_norm(config, params_dtype, device)
        self.eh_proj = nn.Linear(2 * h, h, bias=False, dtype=params_dtype, device="meta")
        weight = torch.empty(h, 2 * h, dtype=params_dtype, device=device)
        init("eh_proj.weight")(weight)  # drawn for the full tensor from its own seed (no global RNG)
        self.eh_proj.weight = nn.Parameter(weight)
        self.layer = layer
        self.final_layernorm = make_norm(config, params_dtype, device)

    def forward(
        self, embedded: torch.Tensor, h: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``embedded``: the word embeddings of the tokens this layer reads (already shifted), ``h`` the previous
        hidden states, both ``[b, s, H]``; returns the layer's output before and after ``final_layernorm``."""
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(h)], dim=-1))
        x = self.layer(x, ctx)
        return x, self.final_layernorm(x)


def run_mtp(
    layers: nn.ModuleList, h: torch.Tensor, word: torch.Tensor, ctx: ForwardContext
) -> tuple[torch.Tensor, ...]:
    """The MTP layers' normed outputs ``[b, s, H]`` each: ``h`` the stack's output before the final norm and
    ``word`` the word embeddings of the input tokens, both the whole sequence; ``ctx`` a context without sequence
    parallelism, rows or cache (its auxiliary terms collect the layers' own)."""
    outs = []
    for k, mtp in enumerate(layers):
        h, out = mtp(shifted(word, k + 1), h, ctx)
        outs.append(out)
    return tuple(outs)
