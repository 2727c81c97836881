"""transformers' own GLM classes, loaded without remote code: ``GlmForCausalLM`` (``model_type: glm``; ChatGLM2/3
and GLM-4-9B shapes) and ``Glm4ForCausalLM`` (``glm4``; GLM-4-0414: the same plus sandwich norms), as
:class:`HFFamily`.

Tensors (``model.`` prefix): ``embed_tokens.weight``; per layer ``layers.{i}.`` + ``input_layernorm.weight``,
``self_attn.{q,k,v}_proj.{weight,bias}`` (our fused ``[Q; K; V]`` split in its three blocks),
``self_attn.o_proj.weight``, ``post_attention_layernorm.weight``, ``mlp.gate_up_proj.weight`` (``[gate; up]``,
transformers' ``gate, up = x.chunk(2, -1)`` then ``up * silu(gate)``: our SwiGLU ``dense_h_to_4h`` ``[W1; W2]``
unchanged), ``mlp.down_proj.weight`` and, for ``glm4``, ``post_self_attn_layernorm.weight`` /
``post_mlp_layernorm.weight``; ``norm.weight``; ``lm_head.weight`` (untied). Rotary: interleaved pairs on the first
``head_dim x partial_rotary_factor`` dims of each head, base ``rope_theta``.

Config keys: transformers' (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``,
``rms_norm_eps``, ``attention_bias``, ``partial_rotary_factor``, ``rope_theta``, ``max_position_embeddings``, ...).
transformers 5 writes the rotary settings as ``rope_parameters``; both spellings are read, and both are written
(4.x reads the top-level keys, 5.x either). The export also writes ``generation_config.json`` and the tokenizer as
``tokenizer.json`` + ``tokenizer_config.json`` (``PreTrainedTokenizerFast``), so ``AutoTokenizer`` and
``AutoModelForCausalLM`` load the folder offline without ``trust_remote_code``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from megatron_glm.config import Architecture, ModelConfig
from megatron_glm.config.architecture import ArchitectureFamily
from megatron_glm.config.sizes import FAMILY_OPTIONS
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import OUTPUT_TENSOR, VOCAB_TENSOR
from megatron_glm.tokens import stop_token_ids

from .hf_family import HFFamily
from .packing import PRECISION_ONLY

TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.*)$")
_ATTENTION = {"attention.dense.weight": "self_attn.o_proj.weight"}
_MLP = {"mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight", "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight"}
_FIXED = {
    VOCAB_TENSOR: "model.embed_tokens.weight",
    OUTPUT_TENSOR: "lm_head.weight",
    "transformer.final_layernorm.weight": "model.norm.weight",
}
#: What the native classes hold besides the recorded fields: ChatGLM2's options (RMSNorm, SwiGLU without linear
#: biases, interleaved partial rotary, pre-norm); the precision options either way (transformers picks its own).
_RECORDED = frozenset(
    {"num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length", "layernorm_epsilon"}
    | {"ffn_hidden_size", "kv_channels", "num_query_groups", "group_query_attention", "add_qkv_bias"}
    | {"rotary_percent", "rotary_base", "untie_embeddings_and_output_weights"}
)
_OPTIONS = {**FAMILY_OPTIONS["chatglm2-6b"], "apply_query_key_layer_scaling": False}
#: Glm4ForCausalLM: GLM-4-0414's options (ChatGLM2's plus the sandwich norms).
_GLM4_OPTIONS = dict(FAMILY_OPTIONS["glm-4-0414"])


def _rename(name: str) -> str:
    if name in _FIXED:
        return _FIXED[name]
    m = _LAYER.match(name)
    if m is None:
        return name
    rest = m.group(2)
    return f"model.layers.{m.group(1)}.{_ATTENTION.get(rest) or _MLP.get(rest) or rest}"


def _split(cfg: ModelConfig, name: str) -> tuple[tuple[str, int], ...]:
    """The fused QKV (weight or bias) as ``q_proj``, ``k_proj``, ``v_proj`` (rows: ``nh hd``, ``g hd``, ``g hd``)."""
    m = _LAYER.match(name)
    if m is None or not m.group(2).startswith("attention.query_key_value."):
        return ()
    kind = m.group(2).rsplit(".", 1)[1]
    rows = (cfg.num_attention_heads * cfg.head_dim, cfg.query_groups * cfg.head_dim, cfg.query_groups * cfg.head_dim)
    return tuple((f"model.layers.{m.group(1)}.self_attn.{p}_proj.{kind}", r) for p, r in zip("qkv", rows))


def native_config(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' GLM config keys of ``cfg`` (shape, rotary both spellings, norms, biases)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": cfg.rotary_percent}
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_dropout": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_sequence_length,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "attention_bias": cfg.add_qkv_bias,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "use_cache": True,
        "rope_theta": cfg.rotary_base,
        "partial_rotary_factor": cfg.rotary_percent,
        "rope_parameters": rope,
    }


def _rope(raw: dict[str, Any], where: str) -> tuple[float, float]:
    """``(rope_theta, partial_rotary_factor)`` from transformers 5's ``rope_parameters`` or 4.x's top-level keys."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: rope_parameters / rope_scaling must be objects")
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported (megatron_glm reads 'default' rotary)")
    merged = {**raw, **params}
    return (
        config_number(merged, "rope_theta", 10000.0, where, float),
        config_number(merged, "partial_rotary_factor", 0.5, where, float),
    )


#: Config values the native classes may hold that our model does not (key, the one value we read).
REFUSED = (("hidden_act", "silu"), ("use_qk_norm", False), ("mlp_bias", False))


def config_number(raw: dict[str, Any], key: str, default: Any, where: str, kind: type = int) -> Any:
    """``raw[key]`` (``default`` when absent or null) as ``kind`` (int or float); a one-line error naming the key
    when it holds something else (a string, a list, a fractional integer)."""
    value = raw.get(key)
    if value is None:
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not whole):
        expected = "an integer" if kind is int else "a number"
        raise CheckpointError(f"{where}: {key} must be {expected}, got {value!r}")
    return kind(value)


def config_flag(raw: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """``raw[key]`` (``default`` when absent or null), which must be a JSON boolean: the string "false" is true to
    ``bool``."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def native_values(raw: dict[str, Any], where: str, refused: tuple[tuple[str, Any], ...] = REFUSED) -> dict[str, Any]:
    """The :class:`ModelConfig` fields a transformers GLM ``config.json`` records (shape, rotary, norms, biases),
    after one-line errors for a missing key or a ``refused`` value."""
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in raw]
    if missing:
        raise CheckpointError(f"{where}: transformers GLM config lacks {', '.join(missing)}")
    for key, wanted in refused:
        if raw.get(key, wanted) != wanted:
            raise CheckpointError(f"{where}: {key} = {raw[key]!r} is not supported (megatron_glm reads {wanted!r})")
    theta, factor = _rope(raw, where)
    hidden, heads = config_number(raw, "hidden_size", 0, where), config_number(raw, "num_attention_heads", 0, where)
    groups = config_number(raw, "num_key_value_heads", 0, where) or heads
    layers, vocab = config_number(raw, "num_hidden_layers", 0, where), config_number(raw, "vocab_size", 0, where)
    sizes = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "vocab_size": vocab}
    if any(v < 1 for v in sizes.values()):
        bad = ", ".join(f"{k} = {v}" for k, v in sizes.items() if v < 1)
        raise CheckpointError(f"{where}: {bad}: must be positive")
    values = dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        kv_channels=config_number(raw, "head_dim", 0, where) or hidden // heads,
        num_query_groups=groups if groups != heads else 0,
        ffn_hidden_size=config_number(raw, "intermediate_size", 0, where) or 4 * hidden,
        vocab_size=vocab,
        max_sequence_length=config_number(raw, "max_position_embeddings", 2048, where),
        layernorm_epsilon=config_number(raw, "rms_norm_eps", 1e-5, where, float),
        rotary_base=theta,
        rotary_percent=factor,
        add_qkv_bias=config_flag(raw, "attention_bias", True, where),
        untie_embeddings_and_output_weights=not config_flag(raw, "tie_word_embeddings", False, where),
        hidden_dropout=0.0,
        attention_dropout=config_number(raw, "attention_dropout", 0.0, where, float),
        init_std=config_number(raw, "initializer_range", 0.02, where, float),
    )
    return values


def _from_config(raw: dict[str, Any], where: str, options: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**{**options, **native_values(raw, where)})


def _family(key: str, model_type: str, options: dict[str, Any]) -> HFFamily:
    return HFFamily(
        model_type=model_type,
        key=key,
        architectures=(key,),
        auto_map={},
        tokenizer_class="PreTrainedTokenizerFast",
        code_files=(),
        prefix="",
        to_config=native_config,
        from_config=lambda raw, where: _from_config(raw, where, options),
        markers=("num_hidden_layers",),
        architecture=ArchitectureFamily(key, Architecture(**options), recorded=_RECORDED, alternatives=PRECISION_ONLY),
        rename=_rename,
        split=_split,
        native=True,
    )


GLM_NATIVE_FAMILY = _family("GlmForCausalLM", "glm", _OPTIONS)
GLM4_NATIVE_FAMILY = _family("Glm4ForCausalLM", "glm4", _GLM4_OPTIONS)
NATIVE_FAMILIES = (GLM_NATIVE_FAMILY, GLM4_NATIVE_FAMILY)


# -- the files besides the weights ----------------------------------------------------------------------------


def _tokenizer_json(tokenizer: Any, out: Path) -> None:
    """``tokenizer.json``: the file itself, or for a tiktoken BPE file the ``tokenizers`` tokenizer built from it."""
    if tokenizer.kind == "tokenizer.json":
        shutil.copyfile(tokenizer.model_path, out / TOKENIZER_JSON)
        return
    from megatron_glm.data.tiktoken_file import build_tiktoken_tokenizer

    build_tiktoken_tokenizer(tokenizer.model_path).save(str(out / TOKENIZER_JSON))


def _tokenizer_config(tokenizer: Any, config: ModelConfig) -> dict[str, Any]:
    """The ``tokenizer_config.json`` next to the tokenizer when it is transformers' fast tokenizer's (a chat
    template kept), else a new one; both name ``PreTrainedTokenizerFast`` and the end-of-text / padding tokens."""
    fields: dict[str, Any] = {}
    beside = Path(tokenizer.model_path).parent / TOKENIZER_CONFIG
    if tokenizer.kind == "tokenizer.json" and beside.is_file():
        try:
            found = json.loads(beside.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            found = None
        if isinstance(found, dict) and "auto_map" not in found:
            fields = {k: v for k, v in found.items() if k != "tokenizer_file"}
    fields["tokenizer_class"] = "PreTrainedTokenizerFast"
    fields.setdefault("eos_token", tokenizer.id_to_token(tokenizer.eos_id))
    fields.setdefault("pad_token", tokenizer.id_to_token(tokenizer.pad_id))
    fields.setdefault("model_max_length", config.max_sequence_length)
    fields.setdefault("clean_up_tokenization_spaces", False)
    return fields


def write_native_files(out: Path, fields: dict[str, Any], config: ModelConfig, tokenizer: Any | None) -> list[str]:
    """``config.json`` (``fields`` with the token ids), ``generation_config.json`` and, with a ``tokenizer.json`` or
    tiktoken ``tokenizer``, the tokenizer files. Returns notes."""
    notes: list[str] = []
    generation: dict[str, Any] = {"do_sample": False, "use_cache": True}
    if tokenizer is not None and tokenizer.kind == "sentencepiece":
        notes.append(
            f"{tokenizer.model_path}: a sentencepiece tokenizer is not written to a transformers-native folder "
            "(it needs tokenizer.json): pass --tokenizer-model with a tokenizer.json"
        )
        tokenizer = None
    if tokenizer is None:  # not transformers' default (GLM-4's 151329: outside a small vocab, the model fails to load)
        fields["pad_token_id"] = None  # the embedding's padding_idx: must be within the vocab or None
    if tokenizer is not None:
        ids = {"eos_token_id": stop_token_ids(tokenizer), "pad_token_id": tokenizer.pad_id}
        fields.update(ids)
        generation.update(ids)
        _tokenizer_json(tokenizer, out)
        cfg = _tokenizer_config(tokenizer, config)
        (out / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(fields, indent=1), encoding="utf-8")
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=1), encoding="utf-8")
    return notes
