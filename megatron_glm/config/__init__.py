"""Typed run configuration: sections, named model sizes, YAML/command-line loading and validation."""

from megatron_glm.config.architecture import ARCHITECTURE_FIELDS, EXECUTION_FIELDS, Architecture
from megatron_glm.config.loader import (
    FLAG_ALIASES,
    build_config,
    config_to_dict,
    help_text,
    load_config,
    load_yaml,
    parse_overrides,
)
from megatron_glm.config.sections import (
    CheckpointConfig,
    DataConfig,
    GLMConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
)
from megatron_glm.config.sizes import MODEL_SIZES
from megatron_glm.config.validate import batch_sizes, derived_data_parallel_size, pad_vocab_size, problems, validate

__all__ = [
    "ARCHITECTURE_FIELDS",
    "EXECUTION_FIELDS",
    "FLAG_ALIASES",
    "MODEL_SIZES",
    "Architecture",
    "CheckpointConfig",
    "DataConfig",
    "GLMConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainingConfig",
    "batch_sizes",
    "build_config",
    "config_to_dict",
    "derived_data_parallel_size",
    "help_text",
    "load_config",
    "load_yaml",
    "pad_vocab_size",
    "parse_overrides",
    "problems",
    "validate",
]
