"""GLM-4.5's multi-token prediction (MTP) options, a mixin of :class:`~megatron_glm.config.sections.ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_glm.config.fields import opt


@dataclass(kw_only=True)
class MTPOptions:
    """The MTP layers (DeepSeek-V3 / GLM-4.5): ``num_nextn_predict_layers`` blocks after the stack, each predicting
    one token further ahead; their loss, weighted, is added to the language-model loss."""

    num_nextn_predict_layers: int = opt(
        0,
        "Multi-token prediction layers (GLM-4.5: 1; 0: off). MTP layer k (transformer.mtp.{k}.) "
        "computes eh_proj(concat(enorm(embedding of the token k+1 ahead), hnorm(previous hidden states))), one "
        "decoder layer (built as layer num_layers + k) and its final_layernorm, then the shared output head "
        "predicts the token k+2 ahead (training and evaluation losses only; generation does not run it).",
    )
    mtp_loss_weight: float = opt(
        0.3, "Weight of the mean MTP loss added to the loss (GLM-4.5's report: 0.3, later 0.1).", execution=True
    )


def mtp_problems(m: Any) -> list[str]:
    """One line per inconsistent MTP option of the model config ``m``."""
    out: list[str] = []
    if m.num_nextn_predict_layers < 0:
        out.append(f"model.num_nextn_predict_layers must be >= 0 (0: off), got {m.num_nextn_predict_layers}")
    if m.mtp_loss_weight < 0:
        out.append(f"model.mtp_loss_weight must be >= 0, got {m.mtp_loss_weight}")
    if m.num_nextn_predict_layers > 0 and m.residual_style != "pre_ln":
        out.append(f"model.num_nextn_predict_layers needs model.residual_style pre_ln, got {m.residual_style}")
    return out
