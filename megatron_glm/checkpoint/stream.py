"""The common currency of checkpoint conversion: a stream of full tensors with the original GLM names.

A *source* (any checkpoint format and parallel layout, see ``formats/``) yields one full (unsharded)
tensor at a time; a *writer* turns the stream into any target layout. Only one full tensor (plus the
output file being assembled) is materialised at a time; source files are memory-mapped and released
layer by layer (:meth:`ModelSource.release`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError

LAYER_SUFFIXES = (
    "input_layernorm.weight", "input_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.dense.weight", "attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)
LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.")
OPTIMIZER_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def glm_tensor_names(config: ModelConfig) -> list[str]:
    """Every tensor name of a GLM model with ``config``, in the model's state-dict order."""
    names = ["word_embeddings.weight", "transformer.position_embeddings.weight"]
    if config.block_position_encoding:
        names.append("transformer.block_position_embeddings.weight")
    for i in range(config.num_layers):
        names += [f"transformer.layers.{i}.{s}" for s in LAYER_SUFFIXES]
    return [*names, "transformer.final_layernorm.weight", "transformer.final_layernorm.bias"]


def glm_tensor_shape(name: str, config: ModelConfig) -> tuple[int, ...]:
    """The full shape of tensor ``name`` for ``config``."""
    h, v, p = config.hidden_size, config.vocab_size, config.max_sequence_length + 1
    if name == "word_embeddings.weight":
        return (v, h)
    if name.endswith("position_embeddings.weight"):
        return (p, h)
    if "query_key_value" in name:
        return (3 * h, h) if name.endswith("weight") else (3 * h,)
    if "dense_h_to_4h" in name:
        return (4 * h, h) if name.endswith("weight") else (4 * h,)
    if name.endswith("dense_4h_to_h.weight"):
        return (h, 4 * h)
    if name.endswith("attention.dense.weight"):
        return (h, h)
    return (h,)


def layer_index(name: str) -> int | None:
    """The transformer layer a tensor belongs to (``None`` for embeddings and the final norm)."""
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def tensor_checksum(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes (row-major), prefixed with dtype and shape."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


@dataclass
class SourceInfo:
    """What a source knows besides its tensors."""

    format: str
    path: str
    config: ModelConfig
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tokenizer_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class ModelSource(Protocol):
    """A checkpoint read as full tensors (any format, any layout)."""

    info: SourceInfo

    def names(self) -> list[str]:
        """Tensor names in model order."""

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (the training weights: fp32 master weights when the checkpoint has them)."""

    def module_tensor(self, name: str) -> torch.Tensor:
        """The full tensor as the model held it (e.g. bf16 under bf16 training)."""

    def optimizer_state(self, name: str) -> dict[str, torch.Tensor] | None:
        """Full AdamW state of ``name`` (``fp32``, ``exp_avg``, ``exp_avg_sq``), or ``None`` without one."""

    def release(self) -> None:
        """Drop memory-mapped files and caches (called between layers)."""


def iter_layers(names: list[str]) -> Iterator[tuple[int | None, list[str]]]:
    """Group ``names`` into runs by layer (embeddings and final norm form their own runs)."""
    run: list[str] = []
    current: int | None = -1
    for n in names:
        li = layer_index(n)
        if run and li != current:
            yield current, run
            run = []
        current = li
        run.append(n)
    if run:
        yield current, run


def check_names(names: list[str], config: ModelConfig, where: str) -> None:
    """Every GLM tensor of ``config`` is present and nothing else."""
    want = glm_tensor_names(config)
    missing = [n for n in want if n not in set(names)]
    extra = [n for n in names if n not in set(want)]
    if missing:
        raise CheckpointError(f"{where}: not a complete GLM checkpoint: {len(missing)} tensors missing, "
                              f"e.g. {missing[:3]}")
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} tensors that a GLM model does not have, e.g. {extra[:3]}")
