"""Merge a LoRA run's adapters into its base: a full-tensor source for the converter (``--merge-lora``).

A LoRA checkpoint holds the adapters only (:mod:`megatron_glm.checkpoint.lora`); :func:`open_merged` reads them
(every tensor-parallel rank's shards, joined with the split of their linear's weight), opens the base its
``meta.json`` names, refuses a base whose identity differs from the recorded one, and presents the base with
every adapted weight replaced by ``W + (alpha / r) B A`` (:func:`~megatron_glm.model.lora.merge_lora`), so any
output format or layout the converter writes is a plain model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.lora import base_identity
from megatron_glm.checkpoint.manager import read_meta
from megatron_glm.checkpoint.reshard import merge_shards
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import ModelLayout, TensorSpec, original_name
from megatron_glm.model.lora import merge_lora
from megatron_glm.parallel.lora import is_lora_name

_TP_RANK = re.compile(r"(?:mp_rank_|-model_)(\d+)(?:_model_states|-model_states)\.pt$")


def adapter_spec(layout: ModelLayout, name: str) -> TensorSpec:
    """The full shape and tensor-parallel split of adapter tensor ``name`` (``<linear>.lora.A`` / ``.B``): for a
    column-parallel weight ``A`` is replicated and ``B`` split with the weight's packed blocks, for a row-parallel
    one ``A`` split by columns and ``B`` replicated."""
    linear, _, which = name.rpartition(".lora.")
    weight = layout[f"{linear}.weight"]
    out_f, in_f = weight.shape
    if which == "A":
        return TensorSpec(name, (0, in_f), "weight", 1 if weight.split_dim == 1 else None)
    return TensorSpec(
        name, (out_f, 0), "weight", 0 if weight.split_dim == 0 else None, weight.blocks, block_sizes=weight.block_sizes
    )


def read_adapters(step: Path, layout: ModelLayout) -> dict[str, torch.Tensor]:
    """The full adapter tensors of LoRA checkpoint ``step`` (ZeRO-0/1/2, with or without a pipeline)."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(step.glob("*model_states.pt")):
        m = _TP_RANK.search(f.name)
        if m is None or f.name.startswith("zero_pp_rank_"):
            continue
        state = safe_torch_load(f, mmap=True)
        module = state.get("module", state) if isinstance(state, dict) else {}
        tp_rank = int(m.group(1)) % max(1, _tp(step))
        for local, t in (module or {}).items():
            name = original_name(local)
            if is_lora_name(name) and isinstance(t, torch.Tensor):
                shards.setdefault(name, {})[tp_rank] = t.detach().float()
    if not shards:
        raise CheckpointError(f"{step}: no LoRA adapters in its model files (a ZeRO-3 LoRA checkpoint is not merged)")
    return {n: merge_shards(adapter_spec(layout, n), [s[r] for r in sorted(s)]) for n, s in shards.items()}


def _tp(step: Path) -> int:
    return int(read_meta(step).get("layout", {}).get("tp", 1))


class MergedSource:
    """A converter source: the base's tensors with the adapters merged in (every other attribute the base's;
    no optimizer state)."""

    def __init__(self, base: Any, adapters: dict[str, torch.Tensor], alpha: float) -> None:
        self.base, self.adapters, self.alpha = base, adapters, alpha
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


def open_merged(path: str | Path, open_source: Any) -> MergedSource:
    """The LoRA checkpoint ``path`` (a ``--save`` directory or a step) merged into the base it records.
    ``open_source``: the converter's opener (detects the base's format)."""
    from megatron_glm.checkpoint.formats.native import find_step_dir

    step = find_step_dir(Path(path))
    record = read_meta(step).get("lora")
    if not record:
        raise CheckpointError(f"{step}: not a LoRA checkpoint (its meta.json records no lora); drop --merge-lora")
    base_path = Path(record["base"])
    if not base_path.exists():
        raise CheckpointError(f"{step}: its LoRA base {base_path} is gone; the adapters cannot be merged without it")
    if base_identity(base_path) != record["base_sha256"]:
        raise CheckpointError(
            f"{step}: its LoRA base {base_path} has changed since training (manifest sha256 differs); "
            "the adapters belong to the original base"
        )
    base = open_source(base_path)
    return MergedSource(base, read_adapters(step, base.info.layout), float(record["alpha"]))
