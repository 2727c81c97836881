"""Helpers shared by the formats: configs from dicts, tokenizer files."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron_glm.config import ModelConfig
from megatron_glm.config.validate import model_config_problems
from megatron_glm.errors import CheckpointError


def model_config_from_dict(fields: dict[str, Any], where: str) -> ModelConfig:
    """A :class:`ModelConfig` from a dict (unknown keys ignored, required ones checked)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in fields]
    if missing:
        raise CheckpointError(f"{where}: model config lacks {', '.join(missing)}")
    return ModelConfig(**{k: v for k, v in fields.items() if k in names})


def check_imported_model(config: ModelConfig, where: str) -> ModelConfig:
    """``config`` (read from ``where``), refused in one line when it is no model we can build."""
    bad = model_config_problems(config)
    if bad:
        raise CheckpointError(f"{where}: not a model megatron_glm can build: {'; '.join(bad)}")
    return config


def tokenizer_files(model_path: str | Path | None) -> list[str]:
    """The sentencepiece model (and its .vocab when present), a ``tokenizer.json`` (or the one in a folder) or a
    tiktoken file, if it exists."""
    if not model_path:
        return []
    p = Path(model_path)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return [str(p / "tokenizer.json")]
    if not p.is_file():
        return []
    out = [str(p)]
    vocab = p.with_suffix(".vocab")
    if vocab.is_file():
        out.append(str(vocab))
    return out
