"""Build a typed config from YAML and command-line overrides, strictly.

The root is :class:`GLMConfig` (training) unless an entry point names another dataclass of sections
(``root=``, e.g. the checkpoint converter's options) with its own flag spellings (``aliases=``): every tool
gets the same dotted flags, YAML files, strict checking and generated help.

Precedence: defaults < named model size (``model.size``) < YAML file < command line.
Command-line overrides use dotted paths (``--model.hidden_size 1024``) or the Megatron/GLM spellings
listed in :data:`FLAG_ALIASES`. Unknown keys are errors with a suggestion. A list field takes several values
after its flag, and a repeated flag adds to it. A field with ``required=True`` in its metadata must be given.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_glm.config.moe import MoEOptions
from megatron_glm.config.mtp import MTPOptions
from megatron_glm.config.sections import GLMConfig
from megatron_glm.config.sizes import MODEL_SIZES
from megatron_glm.errors import ConfigError

# Megatron / GLM / DeepSpeed flag -> (dotted path, constant for valueless flags or None).
FLAG_ALIASES: dict[str, tuple[str, Any]] = {
    "--num-layers": ("model.num_layers", None),
    "--hidden-size": ("model.hidden_size", None),
    "--num-attention-heads": ("model.num_attention_heads", None),
    "--max-position-embeddings": ("model.max_sequence_length", None),
    "--model-size": ("model.size", None),
    "--hidden-dropout": ("model.hidden_dropout", None),
    "--attention-dropout": ("model.attention_dropout", None),
    "--make-vocab-size-divisible-by": ("model.make_vocab_size_divisible_by", None),
    "--position-embedding-type": ("model.position_embedding_type", None),
    "--rotary-percent": ("model.rotary_percent", None),
    "--rotary-base": ("model.rotary_base", None),
    "--rotary-interleaved": ("model.rotary_interleaved", True),
    "--ffn-hidden-size": ("model.ffn_hidden_size", None),
    "--swiglu": ("model.activation", "swiglu"),
    "--normalization": ("model.normalization", None),
    "--layernorm-epsilon": ("model.layernorm_epsilon", None),
    "--norm-epsilon": ("model.layernorm_epsilon", None),
    "--init-method-std": ("model.init_std", None),
    "--group-query-attention": ("model.group_query_attention", True),
    "--num-query-groups": ("model.num_query_groups", None),
    "--kv-channels": ("model.kv_channels", None),
    "--add-qkv-bias": ("model.add_qkv_bias", True),
    "--disable-bias-linear": ("model.add_bias_linear", False),
    "--attention-softmax-in-fp32": ("model.attention_softmax_in_fp32", True),
    "--apply-query-key-layer-scaling": ("model.apply_query_key_layer_scaling", True),
    "--untie-embeddings-and-output-weights": ("model.untie_embeddings_and_output_weights", True),
    "--sandwich-norm": ("model.sandwich_norm", True),
    "--qk-norm": ("model.qk_norm", True),
    **{f"--{f.name.replace('_', '-')}": (f"model.{f.name}", None) for f in dataclasses.fields(MoEOptions)},
    **{f"--{f.name.replace('_', '-')}": (f"model.{f.name}", None) for f in dataclasses.fields(MTPOptions)},
    "--checkpoint-activations": ("model.checkpoint_activations", True),
    "--checkpoint-num-layers": ("model.checkpoint_num_layers", None),
    "--recompute-granularity": ("model.recompute_granularity", None),
    "--sequence-parallel": ("model.sequence_parallel", True),
    "--compile": ("training.compile", True),
    "--cpu-allocator": ("training.cpu_allocator", None),
    "--seq-length": ("data.seq_length", None),
    "--tensor-model-parallel-size": ("parallel.tensor_model_parallel_size", None),
    "--context-parallel-size": ("parallel.context_parallel_size", None),
    "--context-parallel-comm": ("model.context_parallel_comm", None),
    "--pipeline-model-parallel-size": ("parallel.pipeline_model_parallel_size", None),
    "--expert-parallel-size": ("parallel.expert_parallel_size", None),
    "--micro-batch-size": ("training.micro_batch_size", None),
    "--global-batch-size": ("training.global_batch_size", None),
    "--gradient-accumulation-steps": ("training.gradient_accumulation_steps", None),
    "--train-iters": ("training.train_iters", None),
    "--seed": ("training.seed", None),
    "--bf16": ("training.precision", "bf16"),
    "--fp16": ("training.precision", "fp16"),
    "--zero-stage": ("training.zero_stage", None),
    "--eval-interval": ("training.eval_interval", None),
    "--exit-interval": ("training.exit_interval", None),
    "--exit-duration-in-mins": ("training.exit_duration_in_mins", None),
    "--skip-train-iteration-range": ("training.skip_train_iteration_range", None),
    "--eval-iters": ("training.eval_iters", None),
    "--deepspeed_config": ("training.deepspeed_config", None),
    "--deepspeed-config": ("training.deepspeed_config", None),
    "--local_rank": ("training.local_rank", None),
    "--local-rank": ("training.local_rank", None),
    "--distributed-timeout-minutes": ("training.distributed_timeout_minutes", None),
    "--heartbeat-timeout": ("training.heartbeat_timeout", None),
    "--deterministic": ("training.deterministic", True),
    "--deterministic-mode": ("training.deterministic", True),
    "--lr": ("optimizer.lr", None),
    "--min-lr": ("optimizer.min_lr", None),
    "--weight-decay": ("optimizer.weight_decay", None),
    "--clip-grad": ("optimizer.clip_grad", None),
    "--adam-beta1": ("optimizer.adam_beta1", None),
    "--adam-beta2": ("optimizer.adam_beta2", None),
    "--adam-eps": ("optimizer.adam_eps", None),
    "--lr-decay-style": ("optimizer.lr_decay_style", None),
    "--lr-decay-iters": ("optimizer.lr_decay_iters", None),
    "--lr-warmup-iters": ("optimizer.lr_warmup_iters", None),
    "--lr-warmup-fraction": ("optimizer.lr_warmup_fraction", None),
    "--warmup": ("optimizer.lr_warmup_fraction", None),
    "--save": ("checkpoint.save", None),
    "--load": ("checkpoint.load", None),
    "--save-interval": ("checkpoint.save_interval", None),
    "--override-checkpoint-config": ("checkpoint.override_config", True),
    "--override-architecture": ("checkpoint.override_architecture", None),
    "--lora-rank": ("lora.rank", None),
    "--lora-alpha": ("lora.alpha", None),
    "--lora-dropout": ("lora.dropout", None),
    "--lora-targets": ("lora.targets", None),
    "--lora-base": ("lora.base", None),
    "--log-interval": ("logging.log_interval", None),
    "--tensorboard-dir": ("logging.tensorboard_dir", None),
    "--data-path": ("data.data_path", None),
    "--split": ("data.split", None),
    "--tokenizer-model": ("data.tokenizer_model", None),
    "--num-workers": ("data.num_workers", None),
    "--bert-prob": ("data.objective.bert_prob", None),
    "--gap-sentence-prob": ("data.objective.gap_sentence_prob", None),
    "--gap-sentence-ratio": ("data.objective.gap_sentence_ratio", None),
    "--mask-ratio": ("data.objective.mask_ratio", None),
    "--gpt-infill-prob": ("data.objective.gpt_infill_prob", None),
    "--gpt-min-ratio": ("data.objective.gpt_min_ratio", None),
    "--avg-block-length": ("data.objective.avg_block_length", None),
    "--block-mask-prob": ("data.objective.block_mask_prob", None),
    "--context-mask-ratio": ("data.objective.context_mask_ratio", None),
    "--short-seq-prob": ("data.objective.short_seq_prob", None),
    "--single-span-prob": ("data.objective.single_span_prob", None),
    "--task-mask": ("data.objective.task_mask", True),
    "--no-task-mask": ("data.objective.task_mask", False),
    "--no-shuffle-block": ("data.objective.shuffle_block", False),
    "--no-block-position": ("data.objective.block_position", False),
    "--sentinel-token": ("data.objective.sentinel_token", True),
    "--reset-attention-mask": ("data.objective.reset_attention_mask", True),
}

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def leaf_paths(cls: type = GLMConfig, prefix: str = "") -> dict[str, tuple[dataclasses.Field, Any]]:
    """All dotted leaf paths of a config class with their field and type."""
    out: dict[str, tuple[dataclasses.Field, Any]] = {}
    for name, (f, tp) in _fields(cls).items():
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(tp):
            out.update(leaf_paths(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = (f, tp)
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, item_tp, where) for v in items]
    if isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{where}: expected a single {tp.__name__}, got {type(value).__name__}")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
    except ValueError:
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported type {tp}")


def _flatten(data: Any, source: str, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at '{prefix.rstrip('.') or 'top level'}', got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, source, f"{path}."))
        else:
            out[path] = value
    return out


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into flat dotted assignments."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return _flatten(data, str(path))


def parse_overrides(
    argv: list[str],
    flags: dict[str, str] | None = None,
    *,
    root: type = GLMConfig,
    aliases: dict[str, tuple[str, Any]] | None = None,
) -> tuple[str | None, dict[str, Any]]:
    """Split command-line tokens into (yaml path or None, {dotted path: raw value}).

    ``flags``, when given, receives the spelling used on the command line for each dotted path.
    """
    paths = leaf_paths(root)
    aliases = FLAG_ALIASES if aliases is None else aliases
    config_path: str | None = None
    assignments: dict[str, Any] = {}
    repeated: set[str] = set()
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r} (options look like --model.hidden_size 1024)")
        flag, eq, inline = token.partition("=")
        values: list[str] = [inline] if eq else []
        j = i + 1
        if not eq:
            while j < len(argv) and not (argv[j].startswith("--") and not _is_number(argv[j])):
                values.append(argv[j])
                j += 1
        i = j
        if flag == "--config":
            if len(values) != 1:
                raise ConfigError("--config expects one YAML file path")
            config_path = values[0]
            continue
        if flag in aliases:
            path, const = aliases[flag]
            if const is not None:
                if values:
                    raise ConfigError(f"{flag} takes no value (got {' '.join(values)!r})")
                assignments[path] = const
                continue
        else:
            path = flag[2:]
            if path not in paths:
                spelled = [f"--{p}" for p in paths] + list(aliases)
                raise ConfigError(f"unknown option {flag}{_suggest(flag, spelled)}")
        tp = paths[path][1]
        if flags is not None:
            flags[path] = flag
        if typing.get_origin(tp) is list:  # a repeated flag adds to the list (--prompt A --prompt B)
            assignments[path] = [*assignments.get(path, []), *values] if path in repeated else values
            repeated.add(path)
        elif len(values) == 1:
            assignments[path] = values[0]
        elif not values and tp is bool:
            assignments[path] = True
        else:
            raise ConfigError(f"{flag} expects one value, got {len(values)}")
    return config_path, assignments


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def build_config(
    assignments: dict[str, Any],
    source: str = "config",
    sources: dict[str, str] | None = None,
    *,
    root: type = GLMConfig,
) -> Any:
    """Make a ``root`` config (default :class:`GLMConfig`) from dotted assignments (a named model size is
    applied first).

    Errors name ``sources[key]`` (where that value came from, e.g. ``command line (--lr)``) or ``source``.
    """
    paths = leaf_paths(root)
    sources = sources or {}
    for key in assignments:
        if key not in paths:
            raise ConfigError(f"{sources.get(key, source)}: unknown key '{key}'{_suggest(key, list(paths))}")
    cfg = root()
    size = assignments.get("model.size", "")
    merged: dict[str, Any] = {}
    if size:
        if size not in MODEL_SIZES:
            raise ConfigError(
                f"{sources.get('model.size', source)}: model.size '{size}' is not one of {', '.join(MODEL_SIZES)}"
            )
        merged.update({f"model.{k}": v for k, v in MODEL_SIZES[size].items()})
    merged.update(assignments)
    for path, raw in merged.items():
        f, tp = paths[path]
        where = sources.get(path, source)
        value = _coerce(raw, tp, f"{where}: {path}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}: {path} must be one of {', '.join(choices)}, got {value!r}")
        *parents, leaf = path.split(".")
        target: Any = cfg
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    if isinstance(cfg, GLMConfig):
        cfg.explicit = frozenset(merged)
    return cfg


def load_config(argv: list[str], *, root: type = GLMConfig, aliases: dict[str, tuple[str, Any]] | None = None) -> Any:
    """Entry points call this with ``sys.argv[1:]``: ``--config FILE`` plus overrides."""
    flags: dict[str, str] = {}
    config_path, overrides = parse_overrides(argv, flags, root=root, aliases=aliases)
    assignments: dict[str, Any] = {}
    source = "command line"
    if config_path:
        assignments.update(load_yaml(config_path))
        source = config_path
        build_config(assignments, source, root=root)  # report YAML errors against the file
    assignments.update(overrides)
    # A bad command-line value is blamed on the flag that gave it, not on the YAML file.
    sources = {path: f"command line ({flags.get(path, '--' + path)})" for path in overrides}
    cfg = build_config(assignments, source, sources, root=root)
    missing = [
        path for path, (f, _tp) in leaf_paths(root).items() if f.metadata.get("required") and not _get(cfg, path)
    ]
    if missing:
        spelled = {
            path: flag
            for flag, (path, const) in reversed((FLAG_ALIASES if aliases is None else aliases).items())
            if const is None
        }
        names = ", ".join(spelled.get(path, f"--{path}") for path in missing)
        raise ConfigError(f"missing required option{'s' if len(missing) > 1 else ''} {names} (see --help)")
    return cfg


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (for checkpoints, logs and YAML dumps; internal fields left out)."""
    internal = [f.name for f in dataclasses.fields(cfg) if f.metadata.get("internal")]
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in internal}


def help_text(root: type = GLMConfig, aliases: dict[str, tuple[str, Any]] | None = None) -> str:
    """Every option with its type, default and help, grouped by section."""
    lines = ["options (YAML keys or --dotted.path VALUE; the spellings in brackets also accepted):"]
    spelled: dict[str, list[str]] = {}
    for flag, (path, const) in (FLAG_ALIASES if aliases is None else aliases).items():
        if flag != f"--{path}" or const is not None:
            spelled.setdefault(path, []).append(flag if const is None else f"{flag} (={const})")
    for path, (f, tp) in leaf_paths(root).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tname = str(tp) if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))
        if typing.get_origin(tp) is list:
            tname += ", several values or a repeated flag"
        state = "required" if f.metadata.get("required") else f"default {default!r}"
        extra = f"  [{', '.join(spelled[path])}]" if path in spelled else ""
        lines.append(f"  --{path} ({tname}, {state}){extra}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
