"""Consistency checks over the whole config; every problem is reported at once, before any process starts."""

from __future__ import annotations

from megatron_glm.config.context_parallel import context_parallel_problems
from megatron_glm.config.finite import nonfinite_fields
from megatron_glm.config.moe import dense_only_first_stage, moe_problems
from megatron_glm.config.mtp import mtp_problems
from megatron_glm.config.ranges import parse_iteration_ranges
from megatron_glm.config.sections import LORA_TARGETS, GLMConfig, LoraConfig, ModelConfig, ObjectiveConfig
from megatron_glm.errors import ConfigError


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: round up to a multiple of ``divisible_by * tp_size``."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def derived_data_parallel_size(cfg: GLMConfig, world_size: int) -> int:
    """world / (tp x pp x cp), or the configured size when world_size is unknown (0)."""
    p = cfg.parallel
    if world_size:
        return world_size // max(
            1, p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        )
    return p.data_parallel_size or 1


def batch_sizes(cfg: GLMConfig, dp_size: int) -> tuple[int, int, int]:
    """(micro_batch_size, gradient_accumulation_steps, global_batch_size) for ``dp_size`` replicas."""
    t = cfg.training
    micro = t.micro_batch_size
    if t.global_batch_size:
        accum = t.global_batch_size // (micro * dp_size)
    else:
        accum = t.gradient_accumulation_steps or 1
    return micro, accum, micro * accum * dp_size


def family_problems(m: ModelConfig, tp: int) -> list[str]:
    """Inconsistent combinations of the architecture options (positive sizes already checked)."""
    out: list[str] = []
    if m.kv_channels < 0 or m.ffn_hidden_size < 0 or m.num_query_groups < 0:
        out.append(
            "model.kv_channels, model.ffn_hidden_size and model.num_query_groups must be >= 0 (0: the default), "
            f"got {m.kv_channels}, {m.ffn_hidden_size}, {m.num_query_groups}"
        )
        return out
    g, heads = m.num_query_groups, m.num_attention_heads
    if g and heads % g:
        out.append(f"model.num_query_groups ({g}) must divide model.num_attention_heads ({heads})")
    if g and g % tp:
        out.append(
            f"model.num_query_groups ({g}) must be divisible by parallel.tensor_model_parallel_size ({tp}) "
            "(each rank holds whole key/value groups)"
        )
    if m.group_query_attention and not g:
        out.append("model.group_query_attention (--group-query-attention) needs model.num_query_groups > 0")
    if m.ffn_hidden_size and m.ffn_hidden_size % tp:
        out.append(
            f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if not 0.0 < m.rotary_percent <= 1.0:
        out.append(f"model.rotary_percent must be in (0, 1], got {m.rotary_percent}")
    elif m.rotary:
        rotated = m.head_dim * m.rotary_percent
        if m.position_embedding_type == "rope_2d" and m.rotary_percent != 1.0:
            out.append(
                f"model.rotary_percent must be 1 with rope_2d (each half of a head is rotated), got {m.rotary_percent}"
            )
        elif m.position_embedding_type == "rope_2d" and m.head_dim % 4:
            out.append(f"model.position_embedding_type rope_2d needs a head dimension divisible by 4, got {m.head_dim}")
        elif not rotated.is_integer() or int(rotated) % 2:
            out.append(
                f"model.rotary_percent ({m.rotary_percent}) x head dimension ({m.head_dim}) must be an even "
                "whole number of rotated dims"
            )
    if m.rotary and m.rotary_base <= 0:
        out.append(f"model.rotary_base must be positive, got {m.rotary_base}")
    if m.sandwich_norm and m.residual_style != "pre_ln":
        out.append(f"model.sandwich_norm needs model.residual_style pre_ln, got {m.residual_style}")
    if not 0.0 < m.embedding_grad_shrink <= 1.0:
        out.append(f"model.embedding_grad_shrink must be in (0, 1] (1: off), got {m.embedding_grad_shrink}")
    return out + mtp_problems(m)


def model_config_problems(m: ModelConfig) -> list[str]:
    """Why model config ``m`` (read from another format's config file) cannot be built, at tensor-parallel size 1:
    non-positive sizes, non-finite values, the family and MoE options (empty when it can)."""
    sizes = ("num_layers", "hidden_size", "num_attention_heads", "max_sequence_length", "layernorm_epsilon")
    out = nonfinite_fields(m, "model.")
    out += [f"model.{n} must be positive, got {getattr(m, n)}" for n in sizes if not getattr(m, n) > 0]
    return out + family_problems(m, 1) + moe_problems(m, 1)


def problems(cfg: GLMConfig, world_size: int = 0) -> list[str]:
    """Every inconsistency in ``cfg`` as a readable message (empty when valid), section by section.

    ``world_size`` 0 means "not known yet": checks that need it use ``parallel.data_parallel_size``.
    """
    found = _positive_problems(cfg)
    ok = not found  # the divisibility checks need positive sizes
    found += _model_problems(cfg, ok)
    found += _parallel_problems(cfg, world_size) + context_parallel_problems(cfg, world_size)
    dp = derived_data_parallel_size(cfg, world_size)
    if ok and dp > 0:
        found += _batch_problems(cfg, dp)
    return (
        found
        + _training_problems(cfg)
        + _optimizer_problems(cfg)
        + _objective_problems(cfg.data.objective)
        + _data_problems(cfg)
        + lora_problems(cfg.lora)
    )


def _positive_problems(cfg: GLMConfig) -> list[str]:
    m, p = cfg.model, cfg.parallel
    sizes = (
        (m.num_layers, "model.num_layers"),
        (m.hidden_size, "model.hidden_size"),
        (m.num_attention_heads, "model.num_attention_heads"),
        (p.tensor_model_parallel_size, "parallel.tensor_model_parallel_size"),
        (p.pipeline_model_parallel_size, "parallel.pipeline_model_parallel_size"),
        (cfg.training.micro_batch_size, "training.micro_batch_size"),
        (cfg.data.seq_length, "data.seq_length"),
        (m.max_sequence_length, "model.max_sequence_length"),
    )
    return [f"{name} must be positive, got {value}" for value, name in sizes if value <= 0]


def _model_problems(cfg: GLMConfig, sizes_ok: bool) -> list[str]:
    """The model section: shapes against the parallel layout, the execution options, the family options
    (:func:`family_problems`, once) and the dropouts."""
    out: list[str] = []
    m, p, d = cfg.model, cfg.parallel, cfg.data
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if sizes_ok:
        out += _shape_problems(m, tp, pp, p.pipeline_partition_method)
        if d.seq_length > m.max_sequence_length:
            out.append(f"data.seq_length ({d.seq_length}) exceeds model.max_sequence_length ({m.max_sequence_length})")
        if m.num_nextn_predict_layers >= d.seq_length:  # MTP layer k's targets: the tokens k + 2 ahead
            out.append(
                f"model.num_nextn_predict_layers ({m.num_nextn_predict_layers}) must be below data.seq_length "
                f"({d.seq_length}): MTP layers from seq_length - 1 on have no token to predict"
            )
        out += _execution_problems(m, tp, d.seq_length)
        out += family_problems(m, tp)
        out += moe_problems(m, tp, getattr(p, "expert_parallel_size", 1))
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            out.append(f"model.{name} must be in [0, 1), got {getattr(m, name)}")
    return out


def _shape_problems(m: ModelConfig, tp: int, pp: int, partition_method: str) -> list[str]:
    out: list[str] = []
    if m.hidden_size % m.num_attention_heads and not m.kv_channels:
        out.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({m.num_attention_heads})"
        )
    if m.num_attention_heads % tp:
        out.append(
            f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if m.num_layers % pp and partition_method == "uniform":
        out.append(
            f"model.num_layers ({m.num_layers}) must be divisible by "
            f"parallel.pipeline_model_parallel_size ({pp}) for uniform partitioning"
        )
    if m.num_layers < pp:
        out.append(f"model.num_layers ({m.num_layers}) must be at least parallel.pipeline_model_parallel_size ({pp})")
    if m.vocab_size < 0:
        out.append(f"model.vocab_size must be >= 0 (0 derives it from the tokenizer), got {m.vocab_size}")
    elif m.vocab_size and m.vocab_size % tp:
        out.append(
            f"model.vocab_size ({m.vocab_size}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp}); pad it to "
            f"{pad_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)}"
        )
    if m.make_vocab_size_divisible_by <= 0:
        out.append(f"model.make_vocab_size_divisible_by must be positive, got {m.make_vocab_size_divisible_by}")
    return out


def _execution_problems(m: ModelConfig, tp: int, seq_length: int) -> list[str]:
    out: list[str] = []
    if m.checkpoint_num_layers <= 0:
        out.append(f"model.checkpoint_num_layers must be positive, got {m.checkpoint_num_layers}")
    if m.checkpoint_activations and m.recompute_granularity == "selective":
        out.append(
            "model.checkpoint_activations (full recomputation) conflicts with "
            "model.recompute_granularity 'selective'; set one of them"
        )
    if m.sequence_parallel and tp > 1 and seq_length % tp:
        out.append(
            f"model.sequence_parallel needs data.seq_length ({seq_length}) divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if m.head_chunk_size < 0:
        out.append(f"model.head_chunk_size must be >= 0 (0: unfused head), got {m.head_chunk_size}")
    return out


def _parallel_problems(cfg: GLMConfig, world_size: int) -> list[str]:
    out: list[str] = []
    p = cfg.parallel
    # context_parallel_problems reports a non-positive size and the sequence's divisibility
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, max(1, p.context_parallel_size)
    cp_part = f" x context ({cp})" if cp > 1 else ""
    if world_size and tp * pp and world_size % (tp * pp * cp):
        out.append(
            f"world size ({world_size}) must be divisible by tensor ({tp}) x pipeline ({pp}){cp_part} parallel sizes"
        )
    dp = derived_data_parallel_size(cfg, world_size)
    dp_formula = f"world size {world_size} / (tp {tp} x pp {pp}{f' x cp {cp}' if cp > 1 else ''})"
    if world_size and p.data_parallel_size and p.data_parallel_size != dp:
        out.append(f"parallel.data_parallel_size ({p.data_parallel_size}) disagrees with {dp_formula} = {dp}")
    ep = p.expert_parallel_size
    if ep < 1:
        out.append(f"parallel.expert_parallel_size must be >= 1 (1: no expert parallelism), got {ep}")
    elif dp > 0 and dp % ep:
        out.append(
            f"parallel.expert_parallel_size ({ep}) must divide the data-parallel size ({dp}"
            + (f" = {dp_formula})" if world_size else ")")
        )
    if ep > 1 and not cfg.model.num_experts:
        out.append(f"parallel.expert_parallel_size ({ep}) needs an MoE model (model.num_experts > 0)")
    if ep > 1 and cfg.model.moe_capacity_factor:
        out.append("model.moe_capacity_factor: dropping tokens is not supported with expert parallelism (set 0)")
    per_stage = dense_only_first_stage(cfg.model, pp)
    if ep > 1 and p.pipeline_partition_method == "uniform" and per_stage:
        out.append(
            f"parallel.expert_parallel_size ({ep}) with pipeline_model_parallel_size ({pp}): pipeline stage 0 would "
            f"hold dense layers only ({per_stage} layers, model.first_k_dense_replace "
            f"{cfg.model.first_k_dense_replace}); every stage needs MoE layers (fewer stages or more layers)"
        )
    return out


def _batch_problems(cfg: GLMConfig, dp: int) -> list[str]:
    t = cfg.training
    per_step = t.micro_batch_size * dp
    if t.global_batch_size < 0 or t.gradient_accumulation_steps < 0:
        return ["training.global_batch_size and training.gradient_accumulation_steps must be >= 0"]
    if t.global_batch_size and t.global_batch_size % per_step:
        return [
            f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) = {per_step}"
        ]
    if (
        t.global_batch_size
        and t.gradient_accumulation_steps
        and t.global_batch_size != per_step * t.gradient_accumulation_steps
    ):
        return [
            f"training.global_batch_size ({t.global_batch_size}) != micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({dp}) x gradient_accumulation_steps "
            f"({t.gradient_accumulation_steps})"
        ]
    return []


def _training_problems(cfg: GLMConfig) -> list[str]:
    """The training section (and the logging peak)."""
    out: list[str] = []
    t, pp = cfg.training, cfg.parallel.pipeline_model_parallel_size
    if t.train_iters < 0:
        out.append(f"training.train_iters must be >= 0, got {t.train_iters}")
    if cfg.logging.peak_tflops < 0:
        out.append(f"logging.peak_tflops must be >= 0 (0: measured at start-up), got {cfg.logging.peak_tflops}")
    if t.distributed_timeout_minutes <= 0:
        out.append(f"training.distributed_timeout_minutes must be > 0, got {t.distributed_timeout_minutes}")
    if t.heartbeat_timeout < 0:
        out.append(f"training.heartbeat_timeout must be >= 0 seconds (0: off), got {t.heartbeat_timeout}")
    if t.exit_interval < 0 or t.exit_duration_in_mins < 0:
        out.append("training.exit_interval and training.exit_duration_in_mins must be >= 0")
    try:
        parse_iteration_ranges(t.skip_train_iteration_range)
    except ConfigError as exc:
        out.append(str(exc))
    if t.zero_stage not in (0, 1, 2, 3):
        out.append(f"training.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    if pp > 1 and t.zero_stage > 1:
        out.append(
            f"training.zero_stage {t.zero_stage} cannot be combined with pipeline parallelism "
            f"(DeepSpeed supports ZeRO 0/1 with pipelines)"
        )
    return out


def _optimizer_problems(cfg: GLMConfig) -> list[str]:
    out: list[str] = []
    o = cfg.optimizer
    if o.lr < 0 or o.min_lr < 0 or o.min_lr > o.lr:
        out.append(f"optimizer: need 0 <= min_lr ({o.min_lr}) <= lr ({o.lr})")
    if not 0.0 <= o.lr_warmup_fraction <= 1.0:
        out.append(f"optimizer.lr_warmup_fraction must be in [0, 1], got {o.lr_warmup_fraction}")
    return out


def _objective_problems(ob: ObjectiveConfig) -> list[str]:
    probabilities = (
        "bert_prob",
        "gap_sentence_prob",
        "causal_prob",
        "gpt_infill_prob",
        "block_mask_prob",
        "short_seq_prob",
        "single_span_prob",
    )
    out = [
        f"data.objective.{name} must be in [0, 1], got {getattr(ob, name)}"
        for name in probabilities
        if not 0.0 <= getattr(ob, name) <= 1.0
    ]
    mixture = ob.bert_prob + ob.gap_sentence_prob + ob.causal_prob
    if mixture > 1.0 + 1e-9:
        out.append(
            f"data.objective.bert_prob + gap_sentence_prob + causal_prob must be <= 1 (the rest is the document "
            f"objective), got {mixture}"
        )
    for name in ("gap_sentence_ratio", "mask_ratio", "gpt_min_ratio", "context_mask_ratio"):
        if not 0.0 <= getattr(ob, name) <= 1.0:
            out.append(f"data.objective.{name} must be in [0, 1], got {getattr(ob, name)}")
    if ob.avg_block_length <= 0 or ob.max_block_length < 1:
        out.append("data.objective.avg_block_length and max_block_length must be positive")
    if ob.sentinel_token:
        out.append("data.objective.sentinel_token (--sentinel-token) is not supported")
    return out


def _data_problems(cfg: GLMConfig) -> list[str]:
    out: list[str] = []
    d = cfg.data
    parts = d.split.replace("/", ",").split(",")
    try:
        weights = [float(x) for x in parts]
        if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError
    except ValueError:
        out.append(f"data.split must be up to three non-negative weights like '949,50,1', got {d.split!r}")
    pairs_ok = len(d.data_path) <= 1
    if len(d.data_path) > 1 and len(d.data_path) % 2 == 0:
        try:
            [float(w) for w in d.data_path[::2]]
            pairs_ok = True
        except ValueError:
            pass
    if not pairs_ok:
        out.append("data.data_path: give one prefix, or weight/prefix pairs like '0.3 A 0.7 B'")
    prefixes = d.data_path if len(d.data_path) <= 1 else d.data_path[1::2]
    unknown = [p for p in d.objective.causal_datasets if p not in prefixes]
    if unknown and d.data_path:
        out.append(f"data.objective.causal_datasets names {unknown}, which data.data_path does not hold")
    return out


def lora_problems(lora: LoraConfig) -> list[str]:
    """The LoRA section: rank >= 0, alpha > 0, dropout in [0, 1), targets among :data:`LORA_TARGETS`, no base
    without a rank (it would be ignored)."""
    out: list[str] = []
    if lora.rank < 0:
        out.append(f"lora.rank (--lora-rank) must be >= 0 (0: off), got {lora.rank}")
    if lora.base and not lora.rank:
        out.append(
            f"lora.base (--lora-base {lora.base}) is set but lora.rank is 0: pass --lora-rank R for adapters on "
            "that base (to continue training a checkpoint, use --load)"
        )
    if lora.rank and lora.alpha <= 0:
        out.append(f"lora.alpha (--lora-alpha) must be positive, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        out.append(f"lora.dropout (--lora-dropout) must be in [0, 1), got {lora.dropout}")
    names = lora.target_names()
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown:
        out.append(
            f"lora.targets (--lora-targets): unknown {', '.join(unknown)}; choose from {', '.join(LORA_TARGETS)}"
        )
    elif lora.rank and not names:
        out.append(f"lora.targets (--lora-targets) is empty; choose from {', '.join(LORA_TARGETS)}")
    return out


def device_problems(cfg: GLMConfig, device_type: str) -> list[str]:
    """What the device (``"cpu"``, ``"cuda"``; empty: not known) cannot do: fp16 has no CPU kernels in DeepSpeed."""
    if device_type == "cpu" and cfg.training.precision == "fp16":
        return ["training.precision fp16 (--fp16) is not supported on a CPU; use --bf16 (or fp32)"]
    return []


def local_device_type() -> str:
    """The device this process trains on: ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def validate(cfg: GLMConfig, world_size: int = 0, device_type: str = "") -> GLMConfig:
    """Raise :class:`ConfigError` listing every problem (one line, '; '-separated); ``device_type`` (``"cpu"``,
    ``"cuda"``) adds what that device cannot run."""
    found = nonfinite_fields(cfg) + problems(cfg, world_size) + device_problems(cfg, device_type)
    if found:
        raise ConfigError("invalid configuration: " + "; ".join(found))
    return cfg
