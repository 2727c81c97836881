"""One published HuggingFace layout of the GLM family, as data: config keys both ways, tensor names, packing.

A family maps our tensors (``megatron_glm.model.layout`` names) to the published names (``rename``; default: a
prefix), converts a tensor's packing both ways (``to_theirs`` / ``to_ours``; default: unchanged) and lists the
tensors the published layout holds that our model does not (:class:`Derived`: rotary ``inv_freq`` buffers, a tied
head stored twice), which export recomputes and import checks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.config.architecture import ArchitectureFamily

TensorMap = Callable[[ModelConfig, str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Derived:
    """A tensor of the published layout that our model does not hold, made from one of ours (``after``).

    Export writes ``make(t)`` next to our tensor ``after`` (``t``: as exported, in the export dtype). Import checks
    a stored one against ``make`` of the stored ``after``: ``strict`` a mismatch beyond fp16 rounding is an error
    naming the tensor, else a note (the value is not used)."""

    name: str
    after: str
    make: Callable[[torch.Tensor], torch.Tensor]
    strict: bool = True
    note: str = ""
    """Why a non-strict mismatch does not matter (for the note)."""


def _no_derived(config: ModelConfig) -> list[Derived]:
    return []


def _no_split(config: ModelConfig, name: str) -> tuple[tuple[str, int], ...]:
    return ()


@dataclass(frozen=True)
class HFFamily:
    """One published HuggingFace layout: config keys both ways, tensor names and packing, remote code."""

    model_type: str
    architectures: tuple[str, ...]
    auto_map: dict[str, str]
    tokenizer_class: str
    """Our tokenizer's remote-code class ("": the export has no tokenizer files; the family's own is needed)."""
    code_files: tuple[str, ...]
    """Our remote code shipped in the export (``megatron_glm/hf``; empty: THUDM's published code is needed)."""
    prefix: str
    """Prefix of every tensor name in the task-head classes (absent in the bare model's names)."""
    to_config: Callable[[ModelConfig], dict[str, Any]]
    from_config: Callable[[dict[str, Any], str], ModelConfig]
    architecture: ArchitectureFamily
    """The architectures this layout holds (checked field by field on export)."""
    markers: tuple[str, ...] = field(default=())
    """config.json keys that tell this family's layout from our standalone export and from the other families."""
    key: str = ""
    """Name in :data:`FAMILIES` (default: ``model_type``)."""
    rename: Callable[[str], str] | None = None
    """Our tensor name -> the published one (``None``: ``prefix + name``)."""
    to_theirs: TensorMap | None = None
    to_ours: TensorMap | None = None
    derived: Callable[[ModelConfig], list[Derived]] = _no_derived
    split: Callable[[ModelConfig, str], tuple[tuple[str, int], ...]] = _no_split
    """Our tensor -> the published tensors it is stored as, stacked along dim 0 (``(name, rows)`` each, e.g. the
    fused QKV as separate ``q/k/v_proj``; a tensor of more than two dimensions is split as its ``[-1, last]``
    view, e.g. packed experts ``[E, 2F, H]`` as per-expert ``[F, H]`` pieces); empty: one tensor, :meth:`hf_name`."""
    fit: Callable[[ModelConfig, Collection[str]], tuple[ModelConfig, list[str]]] | None = None
    """The config read from ``config.json`` fitted to the tensor names the folder holds (e.g. without the MTP layers
    a config announces but transformers does not save), with notes; ``None``: as read."""
    native: bool = False
    """A transformers class holds the layout (no remote code): the export writes ``tokenizer.json`` and
    transformers' config, and is preferred over a remote-code layout that holds the same model."""

    @property
    def name(self) -> str:
        return self.key or self.model_type

    def check(self, config: ModelConfig) -> str | None:
        """Every architecture field of ``config`` this layout cannot hold, as one phrase (``None``: it holds it)."""
        return self.architecture.mismatch(config.architecture())

    def hf_name(self, name: str) -> str:
        return self.rename(name) if self.rename is not None else self.prefix + name

    def candidates(self, name: str) -> list[str]:
        """The published names under which our tensor ``name`` may be stored (first: the one we write)."""
        return [self.hf_name(name), name] if self.rename is None and self.prefix else [self.hf_name(name)]

    def our_name(self, hf_name: str) -> str:
        return hf_name[len(self.prefix) :] if hf_name.startswith(self.prefix) else hf_name

    def theirs(self, config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.to_theirs(config, name, t) if self.to_theirs is not None else t

    def ours(self, config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.to_ours(config, name, t) if self.to_ours is not None else t
