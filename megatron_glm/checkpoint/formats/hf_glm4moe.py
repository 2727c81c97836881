"""transformers' own ``Glm4MoeForCausalLM`` (``model_type: glm4_moe``: GLM-4.5, GLM-4.5-Air, GLM-4.6), loaded without
remote code, as an :class:`HFFamily`.

Tensors (``model.`` prefix): ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight`` (untied) as the other
native classes; per layer ``layers.{i}.`` + ``input_layernorm.weight``, ``post_attention_layernorm.weight``,
``self_attn.{q,k,v}_proj.{weight,bias}`` (our fused ``[Q; K; V]`` in its three blocks), ``self_attn.o_proj.weight``,
``self_attn.{q,k}_norm.weight`` (QK-norm); the first ``first_k_dense_replace`` layers' MLP as **separate**
``mlp.{gate,up,down}_proj.weight`` (our SwiGLU ``dense_h_to_4h`` ``[W_gate; W_up]`` in its two halves); the MoE
layers' ``mlp.gate.weight [E, H]`` (our ``mlp.router.weight``), ``mlp.gate.e_score_correction_bias [E]`` (fp32, our
``mlp.router.expert_bias``), one tensor per expert ``mlp.experts.{j}.{gate,up,down}_proj.weight`` (our packed
``experts.dense_h_to_4h.weight [E, 2F, H]`` / ``experts.dense_4h_to_h.weight [E, H, F]``; transformers 5 fuses them
when it loads, the files keep them apart) and ``mlp.shared_experts.{gate,up,down}_proj.weight``.

The MTP layers (``megatron_glm.model.mtp``) follow the stack as layers ``num_hidden_layers + k``: ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm`` (our ``final_layernorm``) and a full decoder layer under the same
names, plus ``embed_tokens`` and ``shared_head.head``, copies of the shared embedding and head that GLM-4.5's
release stores (GLM-4.6's does not): written on export, checked (a note if they differ) and not used on import.
transformers does not build the MTP layers and ignores their tensors when it loads; a folder without them (as
transformers saves one) imports with ``num_nextn_predict_layers`` 0 and a note.

Config keys: the native GLM ones (``hf_native``) plus ``n_routed_experts``, ``num_experts_per_tok``,
``moe_intermediate_size``, ``n_shared_experts``, ``first_k_dense_replace``, ``routed_scaling_factor``,
``norm_topk_prob``, ``n_group`` / ``topk_group`` (1: no grouped routing), ``use_qk_norm``,
``num_nextn_predict_layers``. Rotary: half-split (GPT-NeoX) on ``partial_rotary_factor`` of each head. A dense model
(no experts) is written with every layer dense (``first_k_dense_replace = num_hidden_layers``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from megatron_glm.config import Architecture, ModelConfig
from megatron_glm.config.architecture import ArchitectureFamily
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import OUTPUT_TENSOR, VOCAB_TENSOR
from megatron_glm.model.moe import moe_ffn

from .hf_family import Derived, HFFamily
from .hf_native import REFUSED, config_flag, config_number, native_config, native_values
from .packing import PRECISION_ONLY

_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^transformer\.mtp\.(\d+)\.(.*)$")
_FIXED = {
    VOCAB_TENSOR: "model.embed_tokens.weight",
    OUTPUT_TENSOR: "lm_head.weight",
    "transformer.final_layernorm.weight": "model.norm.weight",
}
_MTP_OWN = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "final_layernorm.weight": "shared_head.norm.weight",
}
#: GLM-4.5's options (everything but what config.json records): half-split partial rotary, SwiGLU, RMSNorm, QKV bias
#: only, sigmoid router with the correction bias.
_OPTIONS = dict(
    position_embedding_type="rope",
    rotary_interleaved=False,
    activation="swiglu",
    normalization="RMSNorm",
    add_bias_linear=False,
    attention_softmax_in_fp32=True,
    moe_router_score="sigmoid",
    moe_router_bias=True,
)
_MOE_RECORDED = {
    "num_experts",
    "moe_top_k",
    "moe_intermediate_size",
    "num_shared_experts",
    "first_k_dense_replace",
    "moe_norm_topk_prob",
    "moe_routed_scaling_factor",
}
_RECORDED = frozenset(
    {"num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length", "layernorm_epsilon"}
    | {"ffn_hidden_size", "kv_channels", "num_query_groups", "group_query_attention", "add_qkv_bias"}
    | {"rotary_percent", "rotary_base", "untie_embeddings_and_output_weights", "qk_norm", "num_nextn_predict_layers"}
    | _MOE_RECORDED
)


def _rename(name: str) -> str:
    """The fixed tensors' names (every layer and MTP tensor goes through :func:`_split`, which knows the layer
    count)."""
    return _FIXED.get(name, name)


def _layer_pieces(cfg: ModelConfig, rest: str) -> list[tuple[str, int]]:
    """A layer tensor (``rest``: its name relative to the layer) as ``(transformers name relative to the layer,
    rows)`` pieces stacked along dim 0 (a packed expert tensor as its ``[-1, last]`` view)."""
    h, hd, g, nh = cfg.hidden_size, cfg.head_dim, cfg.query_groups, cfg.num_attention_heads
    e, f, fm = cfg.num_experts, cfg.ffn_size, moe_ffn(cfg)
    if rest.startswith("attention.query_key_value."):
        kind = rest.rsplit(".", 1)[1]
        return [(f"self_attn.{p}_proj.{kind}", r) for p, r in zip("qkv", (nh * hd, g * hd, g * hd))]
    one = {
        "input_layernorm.weight": ("input_layernorm.weight", h),
        "post_attention_layernorm.weight": ("post_attention_layernorm.weight", h),
        "attention.dense.weight": ("self_attn.o_proj.weight", h),
        "attention.q_norm.weight": ("self_attn.q_norm.weight", hd),
        "attention.k_norm.weight": ("self_attn.k_norm.weight", hd),
        "mlp.dense_4h_to_h.weight": ("mlp.down_proj.weight", h),
        "mlp.router.weight": ("mlp.gate.weight", e),
        "mlp.router.expert_bias": ("mlp.gate.e_score_correction_bias", e),
        "mlp.shared_experts.dense_4h_to_h.weight": ("mlp.shared_experts.down_proj.weight", h),
    }
    if rest in one:
        return [one[rest]]
    shared = fm * cfg.num_shared_experts
    halves = {
        "mlp.dense_h_to_4h.weight": ("mlp.", f),
        "mlp.shared_experts.dense_h_to_4h.weight": ("mlp.shared_experts.", shared),
    }
    if rest in halves:
        prefix, rows = halves[rest]
        return [(f"{prefix}gate_proj.weight", rows), (f"{prefix}up_proj.weight", rows)]
    if rest == "mlp.experts.dense_h_to_4h.weight":
        return [(f"mlp.experts.{j}.{p}_proj.weight", fm) for j in range(e) for p in ("gate", "up")]
    if rest == "mlp.experts.dense_4h_to_h.weight":
        return [(f"mlp.experts.{j}.down_proj.weight", h) for j in range(e)]
    raise CheckpointError(f"{rest}: no Glm4MoeForCausalLM tensor holds this layer tensor")


def _split(cfg: ModelConfig, name: str) -> tuple[tuple[str, int], ...]:
    """Every layer and MTP tensor as its published pieces (one piece when it is stored whole)."""
    m = _LAYER.match(name)
    if m is not None:
        prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
    elif (m := _MTP.match(name)) is not None:
        prefix, rest = f"model.layers.{cfg.num_layers + int(m.group(1))}.", m.group(2)
        if rest in _MTP_OWN:
            return ((prefix + _MTP_OWN[rest], cfg.hidden_size),)
        if not rest.startswith("layer."):
            raise CheckpointError(f"{name}: no Glm4MoeForCausalLM tensor holds this MTP tensor")
        rest = rest.removeprefix("layer.")
    else:
        return ()
    return tuple((prefix + n, rows) for n, rows in _layer_pieces(cfg, rest))


def _derived(cfg: ModelConfig) -> list[Derived]:
    """The MTP layers' copies of the shared embedding and head (GLM-4.5's release stores them)."""
    head = VOCAB_TENSOR if not cfg.untie_embeddings_and_output_weights else OUTPUT_TENSOR
    out = []
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_layers + k}."
        for name, after, shared in (
            ("embed_tokens", VOCAB_TENSOR, _FIXED[VOCAB_TENSOR]),
            ("shared_head.head", head, _FIXED[head]),
        ):
            note = f"it differs from {shared}, which the MTP layer shares (used instead)"
            out.append(Derived(f"{prefix}{name}.weight", after, lambda t: t, strict=False, note=note))
    return out


def _to_config(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' Glm4MoeConfig keys of ``cfg`` (a dense model: every layer dense)."""
    moe = cfg.num_experts > 0
    return {
        **native_config(cfg),
        "n_routed_experts": cfg.num_experts if moe else 1,
        "num_experts_per_tok": cfg.moe_top_k if moe else 1,
        "moe_intermediate_size": moe_ffn(cfg),
        "n_shared_experts": cfg.num_shared_experts,
        "first_k_dense_replace": cfg.first_k_dense_replace if moe else cfg.num_layers,
        "routed_scaling_factor": cfg.moe_routed_scaling_factor,
        "norm_topk_prob": cfg.moe_norm_topk_prob,
        "n_group": 1,
        "topk_group": 1,
        "use_qk_norm": cfg.qk_norm,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "output_router_logits": False,
    }


#: The config keys the MoE layers need (transformers' defaults are GLM-4.5's sizes, not the folder's).
_MOE_KEYS = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")


def _moe_values(raw: dict[str, Any], where: str, dense: int, layers: int) -> dict[str, Any]:
    """The MoE fields of the layers from ``first_k_dense_replace`` (``dense``) on, after one-line errors for a
    missing key or a value out of range (every problem found, named by its config.json key)."""
    missing = [k for k in _MOE_KEYS if k not in raw]
    if missing:
        raise CheckpointError(
            f"{where}: lacks {', '.join(missing)} (layers {dense}..{layers - 1} are MoE layers: "
            f"first_k_dense_replace = {dense}, num_hidden_layers = {layers})"
        )
    experts, top_k, size = (config_number(raw, k, 0, where) for k in _MOE_KEYS)
    shared = config_number(raw, "n_shared_experts", 1, where)
    scale = config_number(raw, "routed_scaling_factor", 1.0, where, float)
    bad = [
        f"n_routed_experts must be positive, got {experts}" if experts < 1 else "",
        f"num_experts_per_tok ({top_k}) must be in [1, n_routed_experts = {experts}]"
        if experts >= 1 and not 1 <= top_k <= experts
        else "",
        f"moe_intermediate_size must be positive, got {size}" if size < 1 else "",
        f"n_shared_experts must be >= 0, got {shared}" if shared < 0 else "",
        f"routed_scaling_factor must be a positive finite number, got {scale}"
        if not (math.isfinite(scale) and scale > 0)
        else "",
    ]
    if any(bad):
        raise CheckpointError(f"{where}: {'; '.join(b for b in bad if b)}")
    return dict(
        num_experts=experts,
        moe_top_k=top_k,
        moe_intermediate_size=size,
        num_shared_experts=shared,
        first_k_dense_replace=dense,
        moe_routed_scaling_factor=scale,
        moe_norm_topk_prob=config_flag(raw, "norm_topk_prob", True, where),
    )


def _from_config(raw: dict[str, Any], where: str) -> ModelConfig:
    refused = (*[r for r in REFUSED if r[0] != "use_qk_norm"], ("n_group", 1), ("topk_group", 1))
    values = native_values(raw, where, refused)
    layers = values["num_layers"]
    dense = config_number(raw, "first_k_dense_replace", 1, where)
    if dense < 0:
        raise CheckpointError(f"{where}: first_k_dense_replace must be >= 0, got {dense}")
    if "n_routed_experts" in raw and raw["n_routed_experts"] is None:  # transformers: no MoE layer at all
        dense = layers
    moe = _moe_values(raw, where, dense, layers) if dense < layers else {}
    mtp = config_number(raw, "num_nextn_predict_layers", config_number(raw, "num_mtp_layers", 0, where), where)
    if mtp < 0:
        raise CheckpointError(f"{where}: num_nextn_predict_layers must be >= 0, got {mtp}")
    return ModelConfig(
        **{**_OPTIONS, **values, **moe},
        qk_norm=config_flag(raw, "use_qk_norm", False, where),
        num_nextn_predict_layers=mtp,
    )


def _fit(cfg: ModelConfig, names: Collection[str]) -> tuple[ModelConfig, list[str]]:
    """Without the MTP layers' tensors (transformers saves none), the model without MTP layers."""
    first = f"model.layers.{cfg.num_layers}.eh_proj.weight"
    if not cfg.num_nextn_predict_layers or first in names:
        return cfg, []
    note = (
        f"config.json announces {cfg.num_nextn_predict_layers} MTP layer(s) but the folder holds none ({first}): "
        "imported without them (num_nextn_predict_layers 0)"
    )
    return replace(cfg, num_nextn_predict_layers=0), [note]


GLM4_MOE_FAMILY = HFFamily(
    model_type="glm4_moe",
    key="Glm4MoeForCausalLM",
    architectures=("Glm4MoeForCausalLM",),
    auto_map={},
    tokenizer_class="PreTrainedTokenizerFast",
    code_files=(),
    prefix="",
    to_config=_to_config,
    from_config=_from_config,
    markers=("num_hidden_layers",),
    architecture=ArchitectureFamily(
        "Glm4MoeForCausalLM", Architecture(**_OPTIONS), recorded=_RECORDED, alternatives=PRECISION_ONLY
    ),
    rename=_rename,
    split=_split,
    derived=_derived,
    fit=_fit,
    native=True,
)
