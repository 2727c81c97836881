"""The Mixture-of-Experts options of :class:`~megatron_glm.config.sections.ModelConfig` (GLM-4.5 family) and their
consistency checks.

:class:`MoEOptions` is a base of ``ModelConfig``: its fields are model fields (``--model.num_experts``,
``--num-experts``), part of the sealed architecture except the training-only balancing knobs
(``moe_bias_update_rate``, ``moe_aux_loss_coeff``: in ``TRAINING_ONLY``) and the execution option
``moe_capacity_factor``. With ``num_experts`` 0 (the default) the model is dense and every other MoE option is
inert (``Architecture.canonical`` resets them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_glm.config.fields import opt

#: The architecture fields that mean nothing without experts (reset by ``Architecture.canonical`` when dense).
MOE_FIELDS = (
    "moe_top_k",
    "moe_intermediate_size",
    "num_shared_experts",
    "first_k_dense_replace",
    "moe_router_score",
    "moe_norm_topk_prob",
    "moe_routed_scaling_factor",
    "moe_router_bias",
    "moe_bias_update_rate",
    "moe_aux_loss_coeff",
)


@dataclass(kw_only=True)
class MoEOptions:
    """GLM-4.5's Mixture-of-Experts MLP (``model/moe.py``): ``num_experts`` routed SwiGLU experts of
    ``moe_intermediate_size``, ``moe_top_k`` per token, plus ``num_shared_experts`` always-on experts, on every
    layer from ``first_k_dense_replace`` on."""

    num_experts: int = opt(
        0, "Routed experts per MoE layer (0: a dense model; GLM-4.5: 160, GLM-4.5-Air: 128). Needs swiglu."
    )
    moe_top_k: int = opt(8, "Experts each token is routed to (num_experts_per_tok).")
    moe_intermediate_size: int = opt(0, "Inner size of each routed and shared expert (0: ffn_hidden_size).")
    num_shared_experts: int = opt(
        0, "Shared experts (one SwiGLU MLP of num_shared_experts x moe_intermediate_size) added to every token."
    )
    first_k_dense_replace: int = opt(
        0, "The first k layers keep the dense MLP (ffn_hidden_size); the others are MoE (GLM-4.5: 3, Air: 1)."
    )
    moe_router_score: str = opt(
        "sigmoid",
        "Router scores from the fp32 logits x W_g^T: sigmoid (GLM-4.5, DeepSeek-V3) or softmax over the experts.",
        choices=("sigmoid", "softmax"),
    )
    moe_norm_topk_prob: bool = opt(True, "Divide the chosen k scores by their sum (norm_topk_prob).")
    moe_routed_scaling_factor: float = opt(
        1.0, "Factor on the routed experts' weights (routed_scaling_factor; GLM-4.5: 2.5, Air: 1.0)."
    )
    moe_router_bias: bool = opt(
        True,
        "The per-expert correction bias (router.expert_bias, fp32, e_score_correction_bias): added to the scores "
        "to choose the experts only, moved by moe_bias_update_rate after every step (aux-loss-free balancing).",
    )
    moe_bias_update_rate: float = opt(
        1e-3,
        "Aux-loss-free balancing: after each optimizer step expert_bias += rate x sign(mean load - expert load), "
        "loads counted over the step's tokens on every data-parallel rank (0: off).",
    )
    moe_aux_loss_coeff: float = opt(
        0.0,
        "Coefficient of the sequence-level balance loss (DeepSeek-V3 / GLM-4.5 seq_aux_loss: "
        "coeff x sum_i f_i P_i per sequence, averaged; 0: off). Logged as loss term moe_aux.",
    )
    moe_capacity_factor: float = opt(
        0.0,
        "Expert capacity as a factor of the even share (tokens x top_k / experts); tokens over it are dropped "
        "(their routed output is 0). 0: no capacity, no token dropped.",
        execution=True,
    )


def dense_only_first_stage(m: Any, pp: int) -> int:
    """The layers pipeline stage 0 holds when a uniform split of model config ``m``'s layers over ``pp`` stages
    leaves it only the first ``first_k_dense_replace`` dense layers (0 when it holds an MoE layer): a layout expert
    parallelism cannot run (DeepSpeed's MoE engine needs an expert group on every stage)."""
    per_stage = m.num_layers // max(pp, 1)
    return per_stage if pp > 1 and 0 < per_stage <= m.first_k_dense_replace else 0


def moe_problems(m: Any, tp: int, ep: int = 1) -> list[str]:
    """Inconsistent MoE options of model config ``m`` with tensor-parallel size ``tp`` and expert-parallel size
    ``ep`` (one message each, naming the field and the value got)."""
    if m.num_experts < 0:
        return [f"model.num_experts must be >= 0 (0: a dense model), got {m.num_experts}"]
    if not m.num_experts:
        defaults = {f: MoEOptions.__dataclass_fields__[f].default for f in (*MOE_FIELDS, "moe_capacity_factor")}
        changed = [f for f, d in defaults.items() if getattr(m, f) != d]
        return [f"model.{f} is an MoE option but model.num_experts is 0 (a dense model)" for f in changed]
    out: list[str] = []
    e, k = m.num_experts, m.moe_top_k
    if not 0 < k <= e:
        out.append(f"model.moe_top_k ({k}) must be in [1, model.num_experts = {e}]")
    if ep > 1 and e % ep:
        out.append(f"model.num_experts ({e}) must be divisible by parallel.expert_parallel_size ({ep})")
    if m.activation != "swiglu":
        out.append(f"model.num_experts > 0 needs model.activation swiglu (the experts are SwiGLU), got {m.activation}")
    f = m.moe_intermediate_size
    if f < 0 or m.num_shared_experts < 0:
        out.append(
            f"model.moe_intermediate_size and model.num_shared_experts must be >= 0, got {f}, {m.num_shared_experts}"
        )
    elif (f or m.ffn_size) % tp:
        out.append(
            f"model.moe_intermediate_size ({f or m.ffn_size}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if not 0 <= m.first_k_dense_replace <= m.num_layers:
        out.append(
            f"model.first_k_dense_replace must be in [0, model.num_layers = {m.num_layers}], "
            f"got {m.first_k_dense_replace}"
        )
    if m.moe_routed_scaling_factor <= 0:
        out.append(f"model.moe_routed_scaling_factor must be positive, got {m.moe_routed_scaling_factor}")
    if m.moe_bias_update_rate < 0 or m.moe_aux_loss_coeff < 0 or m.moe_capacity_factor < 0:
        out.append(
            "model.moe_bias_update_rate, model.moe_aux_loss_coeff and model.moe_capacity_factor must be >= 0, got "
            f"{m.moe_bias_update_rate}, {m.moe_aux_loss_coeff}, {m.moe_capacity_factor}"
        )
    return out
