"""THUDM's HuggingFace layouts of ChatGLM-6B and ChatGLM2-6B (both ``model_type: chatglm``), as :class:`HFFamily`.

The export holds the weights and ``config.json`` in their layout, for THUDM's published model code
(``configuration_chatglm.py``, ``modeling_chatglm.py``, tokenizer files): we ship no model code for these
families, so copy those files from the published repository into the folder before loading it with
``trust_remote_code``.

**ChatGLM-6B** (told by ``inner_hidden_size`` / ``position_encoding_2d``): ``transformer.word_embeddings.weight``;
per layer ``transformer.layers.{i}.`` + our names, ``attention.query_key_value`` packed per head
(``[q_h; k_h; v_h]``, converted to our ``[Q; K; V]``); ``transformer.final_layernorm``; ``lm_head.weight``. Tied
(``tie_word_embeddings`` absent or true, the release): HF's code ties ``lm_head`` to the word embedding on load,
so we import it tied (a stored ``lm_head`` that differs is noted and dropped) and export a copy of the word
embedding; ``tie_word_embeddings: false`` maps it to our ``output_layer.weight``. Per-layer buffer
``attention.rotary_emb.inv_freq`` (``[hd / 4]``): the frequencies of an ``hd / 2``-dim rotary, computed in fp32
and rounded to fp16 as THUDM's code does (then stored in the weights' dtype); checked on import, recomputed on
export. Quirks of THUDM's code that we do not copy (our model keeps its own math): alpha is sqrt(2 L) in ours
(theirs: sqrt(56) whatever ``num_layers``, the same for the released 28 layers) and our rotary uses exact
frequencies (theirs: the fp16-rounded buffer, up to 0.32 rad of phase at position 2047).

**ChatGLM2-6B** (told by ``padded_vocab_size`` / ``multi_query_attention`` / ``kv_channels``):
``transformer.embedding.word_embeddings.weight``, ``transformer.rotary_pos_emb.inv_freq`` (``[hd / 4]``,
computed in the weights' dtype as their code does), per layer ``transformer.encoder.layers.{i}.`` +
``input_layernorm``, ``self_attention.query_key_value`` (``[Q; K of the groups; V of the groups]``: ours
unchanged), ``self_attention.dense``, ``post_attention_layernorm``, ``mlp.dense_h_to_4h`` (SwiGLU ``[gate; up]``,
ours), ``mlp.dense_4h_to_h``; ``transformer.encoder.final_layernorm``; ``transformer.output_layer.weight``.
ChatGLM3-6B and GLM-4-9B's remote code (``THUDM/glm-4-9b(-chat)``) use the same layout with ``rope_ratio``: their
rotary base is ``10000 x rope_ratio`` (read; written when the base is not 10000).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megatron_glm.config import Architecture, ModelConfig
from megatron_glm.config.architecture import ArchitectureFamily
from megatron_glm.config.sizes import FAMILY_OPTIONS, MODEL_SIZES
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import OUTPUT_TENSOR, VOCAB_TENSOR

from .hf_family import Derived, HFFamily
from .packing import PRECISION_ONLY, ours_to_per_head, per_head_to_ours, rotary_inv_freq

_SHAPES = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "max_sequence_length",
    "ffn_hidden_size",
    "kv_channels",
    "num_query_groups",
)
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.*)$")
#: Published token ids of ChatGLM-6B by padded vocab (the first release and the later 130528-row one).
CHATGLM_TOKEN_IDS = {
    150528: {"bos_token_id": 150004, "eos_token_id": 150005, "mask_token_id": 150000, "gmask_token_id": 150001,
             "pad_token_id": 20003},
    130528: {"bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
             "pad_token_id": 3},
}  # fmt: skip


def _options(size: str) -> dict[str, Any]:
    return {k: v for k, v in MODEL_SIZES[size].items() if k not in _SHAPES}


def _require(raw: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise CheckpointError(f"{where}: ChatGLM config lacks {', '.join(missing)}")


def _unsupported(where: str, key: str, value: object, wanted: object) -> None:
    if value != wanted:
        raise CheckpointError(f"{where}: {key} = {value!r} is not supported (megatron_glm reads {wanted!r})")


# -- ChatGLM-6B ------------------------------------------------------------------------------------------------

#: What the layout holds: the release's options (DeepNorm and post-LN alpha share the forward), the shapes its
#: config.json records; multi-head attention with head size hidden / heads.
CHATGLM_ARCH = ArchitectureFamily(
    "chatglm-6b",
    Architecture(**FAMILY_OPTIONS["chatglm-6b"]),
    recorded=frozenset(
        {"num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size", "max_sequence_length"}
        | {"layernorm_epsilon", "untie_embeddings_and_output_weights"}
    ),
    alternatives={"residual_style": ("deepnorm",), **PRECISION_ONLY},
)


def _chatglm_to_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "inner_hidden_size": cfg.ffn_size,
        "max_sequence_length": cfg.max_sequence_length,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "position_encoding_2d": True,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "use_cache": True,
        **CHATGLM_TOKEN_IDS.get(cfg.vocab_size, {}),
    }


def _chatglm_from_config(raw: dict[str, Any], where: str) -> ModelConfig:
    _require(raw, ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"), where)
    _unsupported(where, "position_encoding_2d", raw.get("position_encoding_2d", True), True)
    _unsupported(where, "quantization_bit", raw.get("quantization_bit", 0), 0)
    _unsupported(where, "pre_seq_len", raw.get("pre_seq_len"), None)
    hidden = int(raw["hidden_size"])
    return ModelConfig(
        **_options("chatglm-6b"),
        num_layers=int(raw["num_layers"]),
        hidden_size=hidden,
        num_attention_heads=int(raw["num_attention_heads"]),
        vocab_size=int(raw["vocab_size"]),
        ffn_hidden_size=int(raw.get("inner_hidden_size") or 4 * hidden),
        max_sequence_length=int(raw.get("max_sequence_length", 2048)),
        layernorm_epsilon=float(raw.get("layernorm_epsilon", 1e-5)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        untie_embeddings_and_output_weights=not raw.get("tie_word_embeddings", True),
    )


def _chatglm_rename(name: str) -> str:
    return {VOCAB_TENSOR: "transformer.word_embeddings.weight", OUTPUT_TENSOR: "lm_head.weight"}.get(name, name)


def _is_qkv(name: str) -> bool:
    return ".attention.query_key_value." in name


def _chatglm_to_theirs(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return ours_to_per_head(t, cfg.num_attention_heads, _chatglm_rename(name)) if _is_qkv(name) else t


def _chatglm_to_ours(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return per_head_to_ours(t, cfg.num_attention_heads, _chatglm_rename(name)) if _is_qkv(name) else t


def _chatglm_derived(cfg: ModelConfig) -> list[Derived]:
    inv = rotary_inv_freq(cfg.head_dim // 2, cfg.rotary_base, compute=torch.float32, rounded=torch.float16)
    out = [
        Derived(
            f"transformer.layers.{i}.attention.rotary_emb.inv_freq",
            f"transformer.layers.{i}.attention.query_key_value.weight",
            lambda t: inv.to(t.dtype),
        )
        for i in range(cfg.num_layers)
    ]
    if not cfg.untie_embeddings_and_output_weights:
        out.append(
            Derived(
                "lm_head.weight",
                VOCAB_TENSOR,
                lambda t: t.clone(),
                strict=False,
                note="it differs from the word embedding, which HF's code ties to it on load "
                "(tie_word_embeddings): imported tied, exported as a copy of the word embedding",
            )
        )
    return out


CHATGLM_FAMILY = HFFamily(
    model_type="chatglm",
    key="chatglm-6b",
    architectures=("ChatGLMModel",),
    auto_map={
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
    tokenizer_class="",
    code_files=(),
    prefix="",
    to_config=_chatglm_to_config,
    from_config=_chatglm_from_config,
    markers=("inner_hidden_size", "position_encoding_2d"),
    architecture=CHATGLM_ARCH,
    rename=_chatglm_rename,
    to_theirs=_chatglm_to_theirs,
    to_ours=_chatglm_to_ours,
    derived=_chatglm_derived,
)

# -- ChatGLM2-6B -----------------------------------------------------------------------------------------------

#: What the layout holds: the release's options, and the shapes, groups, biases and precision options its
#: config.json records.
CHATGLM2_ARCH = ArchitectureFamily(
    "chatglm2-6b",
    Architecture(**FAMILY_OPTIONS["chatglm2-6b"]),
    recorded=frozenset(
        {"num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size", "vocab_size"}
        | {"max_sequence_length", "num_query_groups", "group_query_attention", "add_bias_linear", "add_qkv_bias"}
        | {"apply_query_key_layer_scaling", "attention_softmax_in_fp32", "layernorm_epsilon", "rotary_base"}
    ),
)


def _chatglm2_to_config(cfg: ModelConfig) -> dict[str, Any]:
    groups = cfg.num_query_groups if cfg.query_groups != cfg.num_attention_heads else 0
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "kv_channels": cfg.head_dim,
        "ffn_hidden_size": cfg.ffn_size,
        "padded_vocab_size": cfg.vocab_size,
        "seq_length": cfg.max_sequence_length,
        "multi_query_attention": bool(groups),
        "multi_query_group_num": groups or 1,
        "add_bias_linear": cfg.add_bias_linear,
        "add_qkv_bias": cfg.add_qkv_bias,
        "apply_query_key_layer_scaling": cfg.apply_query_key_layer_scaling,
        "apply_residual_connection_post_layernorm": False,
        "attention_softmax_in_fp32": cfg.attention_softmax_in_fp32,
        "fp32_residual_connection": False,
        "hidden_dropout": cfg.hidden_dropout,
        "attention_dropout": cfg.attention_dropout,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "rmsnorm": True,
        "post_layer_norm": True,
        "original_rope": True,
        "tie_word_embeddings": False,
        **({"rope_ratio": _rope_ratio(cfg.rotary_base)} if cfg.rotary_base != 10000.0 else {}),
    }


def _rope_ratio(base: float) -> float | int:
    """ChatGLM3 / GLM-4's ``rope_ratio``: their code's rotary base is ``10000 x rope_ratio`` (ChatGLM2's code has
    no such key: written only when the base is not 10000)."""
    ratio = base / 10000.0
    return int(ratio) if ratio.is_integer() else ratio


def _chatglm2_from_config(raw: dict[str, Any], where: str) -> ModelConfig:
    _require(raw, ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"), where)
    for key, wanted in (
        ("rmsnorm", True),
        ("post_layer_norm", True),
        ("apply_residual_connection_post_layernorm", False),
        ("original_rope", True),
        ("tie_word_embeddings", False),
        ("quantization_bit", 0),
        ("pre_seq_len", None),
    ):
        _unsupported(where, key, raw.get(key, wanted), wanted)
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    return ModelConfig(
        **{
            **_options("chatglm2-6b"),
            "add_bias_linear": bool(raw.get("add_bias_linear", False)),
            "add_qkv_bias": bool(raw.get("add_qkv_bias", True)),
            "apply_query_key_layer_scaling": bool(raw.get("apply_query_key_layer_scaling", True)),
            "attention_softmax_in_fp32": bool(raw.get("attention_softmax_in_fp32", True)),
        },
        num_layers=int(raw["num_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        kv_channels=int(raw.get("kv_channels") or hidden // heads),
        num_query_groups=int(raw.get("multi_query_group_num", 1)) if raw.get("multi_query_attention") else 0,
        ffn_hidden_size=int(raw.get("ffn_hidden_size") or 4 * hidden),
        vocab_size=int(raw["padded_vocab_size"]),
        max_sequence_length=int(raw.get("seq_length", 2048)),
        layernorm_epsilon=float(raw.get("layernorm_epsilon", 1e-5)),
        rotary_base=10000.0 * float(raw.get("rope_ratio") or 1),
        hidden_dropout=float(raw.get("hidden_dropout", 0.0)),
        attention_dropout=float(raw.get("attention_dropout", 0.0)),
    )


def _chatglm2_rename(name: str) -> str:
    fixed = {
        VOCAB_TENSOR: "transformer.embedding.word_embeddings.weight",
        OUTPUT_TENSOR: "transformer.output_layer.weight",
        "transformer.final_layernorm.weight": "transformer.encoder.final_layernorm.weight",
        "transformer.final_layernorm.bias": "transformer.encoder.final_layernorm.bias",
    }
    if name in fixed:
        return fixed[name]
    m = _LAYER.match(name)
    if m is None:
        return name
    rest = m.group(2)
    if rest.startswith("attention."):
        rest = "self_attention." + rest[len("attention.") :]
    return f"transformer.encoder.layers.{m.group(1)}.{rest}"


def _chatglm2_derived(cfg: ModelConfig) -> list[Derived]:
    dim = round(cfg.head_dim * cfg.rotary_percent)
    return [
        Derived(
            "transformer.rotary_pos_emb.inv_freq",
            VOCAB_TENSOR,
            lambda t: rotary_inv_freq(dim, cfg.rotary_base, compute=t.dtype),
        )
    ]


CHATGLM2_FAMILY = HFFamily(
    model_type="chatglm",
    key="chatglm2-6b",
    architectures=("ChatGLMModel",),
    auto_map={
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
    tokenizer_class="",
    code_files=(),
    prefix="",
    to_config=_chatglm2_to_config,
    from_config=_chatglm2_from_config,
    markers=("padded_vocab_size", "multi_query_attention", "kv_channels"),
    architecture=CHATGLM2_ARCH,
    rename=_chatglm2_rename,
    derived=_chatglm2_derived,
)
