"""The DeepSpeed config: derived from ours, or a user JSON whose batch/precision fields must agree with ours.

Batch sizes, precision, gradient clipping and the ZeRO stage come from :class:`GLMConfig`; a JSON file
(``--deepspeed_config``) adds engine options (offload, bucket sizes, ...). A field present in both with a
different value is a :class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from megatron_glm.config import GLMConfig, batch_sizes
from megatron_glm.errors import ConfigError


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed config not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _agree(ds: dict[str, Any], key: str, value: Any, ours: str, source: str) -> None:
    if key in ds and ds[key] != "auto" and ds[key] != value:
        raise ConfigError(
            f"{source}: {key} is {ds[key]!r} but {ours} gives {value!r}; "
            f"remove it from the JSON (it is filled from our config) or make them equal"
        )
    ds[key] = value


def _unpartitioned_activations(ds: dict[str, Any], source: str) -> None:
    """Pipeline activations travel whole, not split over the tensor-parallel ranks (DeepSpeed's default): they
    carry the auxiliary-loss accumulator with its gradient, and sequence-parallel shards differ by rank."""
    section = ds.setdefault("pipeline", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: 'pipeline' must be an object")
    for key in ("pipe_partitioned", "grad_partitioned"):
        if section.get(key, False) is True:
            raise ConfigError(
                f"{source}: pipeline.{key} must be false (megatron_glm's pipeline activations are not partitioned)"
            )
        section[key] = False


def build_deepspeed_config(cfg: GLMConfig, dp_size: int, cp_size: int = 1) -> dict[str, Any]:
    """The dict passed to ``deepspeed.initialize(config=...)``. ``cp_size``: DeepSpeed's data-parallel world is the
    ``dp x cp`` ranks reducing gradients, so its ``train_batch_size`` counts each context-parallel rank (they read
    the same samples: the run's global batch stays ``training.global_batch_size``)."""
    source = cfg.training.deepspeed_config
    ds = copy.deepcopy(read_json(source)) if source else {}
    source = source or "derived DeepSpeed config"
    micro, accum, global_batch = batch_sizes(cfg, dp_size)
    _agree(ds, "train_micro_batch_size_per_gpu", micro, "training.micro_batch_size", source)
    _agree(ds, "gradient_accumulation_steps", accum, "training.global_batch_size / (micro x dp)", source)
    _agree(ds, "train_batch_size", global_batch, "training.global_batch_size", source)
    ds["train_batch_size"] = global_batch * cp_size
    _agree(ds, "gradient_clipping", cfg.optimizer.clip_grad, "optimizer.clip_grad", source)
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: '{name}' must be an object")
        wanted = cfg.training.precision == name
        if section.get("enabled", False) not in (wanted, "auto") and "enabled" in section:
            flag = f"--{name}" if section["enabled"] else f"(precision is {cfg.training.precision})"
            raise ConfigError(
                f"{source}: {name}.enabled is {section['enabled']} but training.precision is "
                f"{cfg.training.precision!r}; pass {flag} or edit the JSON"
            )
        section["enabled"] = wanted
    if cfg.training.precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
        ds["fp16"].setdefault("initial_scale_power", 16)
    zero = ds.setdefault("zero_optimization", {})
    zero.setdefault("stage", cfg.training.zero_stage)  # a JSON that names its stage keeps it
    if cfg.parallel.pipeline_model_parallel_size > 1 and zero["stage"] > 1:
        raise ConfigError(
            f"{source}: ZeRO stage {zero['stage']} cannot be used with pipeline parallelism (use stage 0 or 1)"
        )
    if cfg.parallel.pipeline_model_parallel_size > 1 and ds["bf16"]["enabled"] and zero["stage"] == 0:
        raise ConfigError(
            f"{source}: bf16 with ZeRO stage 0 and pipeline parallelism is refused: DeepSpeed "
            f"0.19's bf16 optimizer cannot load such pipeline checkpoints (KeyError 0 in "
            f"load_checkpoint); use ZeRO stage 1 (--zero-stage 1 or ds_configs/zero1_bf16.json)"
        )
    if cfg.parallel.pipeline_model_parallel_size > 1:
        _unpartitioned_activations(ds, source)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{source}: remove the '{key}' section; megatron_glm builds AdamW and the "
                f"learning-rate schedule from the optimizer.* options"
            )
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer waits for the device twice per micro-batch; the trainer times steps itself.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    return ds
