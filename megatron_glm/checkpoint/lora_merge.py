"""Merge a LoRA run's adapters into its base: a full-tensor source for the converter (``--merge-lora``).

A LoRA checkpoint holds the adapters only (:mod:`megatron_glm.checkpoint.lora`); :func:`open_merged` reads them
(:mod:`megatron_glm.checkpoint.lora_read`: every tensor-parallel rank's shards joined, any ZeRO stage, the fp32
master copy where the checkpoint holds one), opens the base its ``meta.json`` names, refuses a base whose
identity differs from the recorded one, and presents the base with
every adapted weight replaced by ``W + (alpha / r) B A`` (:func:`~megatron_glm.model.lora.merge_lora`), so any
output format or layout the converter writes is a plain model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.lora_read import adapter_spec, open_lora, read_adapter_set, read_adapters
from megatron_glm.model.lora import merge_lora

__all__ = ["MergedSource", "adapter_spec", "open_merged", "read_adapters"]


class MergedSource:
    """A converter source: the base's tensors with the adapters merged in (every other attribute the base's;
    no optimizer state)."""

    def __init__(self, base: Any, adapters: dict[str, torch.Tensor], alpha: float, origin: str, lora: Any) -> None:
        self.base, self.adapters, self.alpha, self.origin, self.lora = base, adapters, alpha, origin, lora
        self.linears = {n.rpartition(".lora.")[0] + ".weight" for n in adapters}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def tensor(self, name: str) -> torch.Tensor:
        t = self.base.tensor(name)
        if name not in self.linears:
            return t
        linear = name[: -len(".weight")]
        parts = {name: t, **{f"{linear}.lora.{x}": self.adapters[f"{linear}.lora.{x}"] for x in ("A", "B")}}
        return merge_lora(parts, self.alpha)[name]

    def module_tensor(self, name: str) -> torch.Tensor:
        return self.tensor(name)

    def optimizer_state(self, name: str) -> None:
        return None

    def optimizer_note(self) -> str:
        return "merged LoRA weights carry no optimizer state"


def open_merged(path: str | Path, open_source: Any, flag: str = "--merge-lora") -> MergedSource:
    """The LoRA checkpoint ``path`` (a ``--save`` directory or a step) merged into the base it records.
    ``open_source``: the converter's opener (detects the base's format). ``origin`` says where the adapters
    were read from (the fp32 master copy when the checkpoint holds one: the merge is done in fp32, then cast
    to the base weight's dtype)."""
    lora = open_lora(path, flag)
    base = open_source(lora.base_path)
    adapters = read_adapter_set(lora.step, base.info.layout)
    return MergedSource(base, adapters.tensors, float(lora.record["alpha"]), adapters.origin, lora)
