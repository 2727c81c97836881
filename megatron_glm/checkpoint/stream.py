"""The common currency of checkpoint conversion: a stream of full tensors with the original GLM names.

A *source* (any checkpoint format and parallel layout, see ``formats/``) yields one full (unsharded)
tensor at a time; a *writer* turns the stream into any target layout. Only one full tensor (plus the
output file being assembled) is materialised at a time; source files are memory-mapped and released
layer by layer (:meth:`ModelSource.release`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.model.layout import ModelLayout, layer_index

OPTIMIZER_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


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

    @cached_property
    def layout(self) -> ModelLayout:
        """Names, shapes, splits and pipeline positions of the tensors (from ``config``)."""
        return ModelLayout(self.config)


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
