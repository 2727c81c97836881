"""Read a LoRA run's checkpoint: its record, its base (checked against the recorded identity) and its full adapters.

A LoRA checkpoint holds the adapters only (:mod:`megatron_glm.checkpoint.lora`). :func:`read_adapters` joins every
tensor-parallel rank's shards with the split of their linear's weight (:func:`adapter_spec`) and reads them from

- the fp32 master copy in the ZeRO optimizer files when the checkpoint has them (ZeRO-1/2, bf16 ZeRO-1, pipeline
  ZeRO-1, and ZeRO-3, whose model files hold no values at all): the exact trained values whatever the training
  dtype;
- else the model files (ZeRO-0), in the training dtype (cast to fp32).

:class:`AdapterSet` says which one was used (``origin``), for the converter's report.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.lora import base_identity
from megatron_glm.checkpoint.manager import read_meta
from megatron_glm.checkpoint.reshard import merge_shards
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.zero import ZeroReader
from megatron_glm.errors import CheckpointError
from megatron_glm.model.expert_lora import expert_adapter_specs
from megatron_glm.model.layout import ModelLayout, TensorSpec, original_name
from megatron_glm.parallel.lora import is_lora_name

_TP_RANK = re.compile(r"(?:mp_rank_|-model_)(\d+)(?:_model_states|-model_states)\.pt$")


def adapter_spec(layout: ModelLayout, name: str) -> TensorSpec:
    """The full shape and tensor-parallel split of adapter tensor ``name`` (``<linear>.lora.A`` / ``.B``): for a
    column-parallel weight ``A`` is replicated and ``B`` split with the weight's packed blocks, for a row-parallel
    one ``A`` split by columns and ``B`` replicated (an expert weight ``[E, out, in]``: ``A [E, r, in]``, ``B [E, out,
    r]``, :func:`~megatron_glm.model.expert_lora.expert_adapter_specs`; ``r`` is 0 in the shapes)."""
    linear, _, which = name.rpartition(".lora.")
    weight = layout[f"{linear}.weight"]
    if weight.expert_dim is not None:
        return dict(zip("AB", expert_adapter_specs(f"{linear}.lora", weight, 0), strict=True))[which]
    out_f, in_f = weight.shape
    if which == "A":
        return TensorSpec(name, (0, in_f), "weight", 1 if weight.split_dim == 1 else None)
    return TensorSpec(
        name, (out_f, 0), "weight", 0 if weight.split_dim == 0 else None, weight.blocks, block_sizes=weight.block_sizes
    )


@dataclasses.dataclass
class AdapterSet:
    """The full adapters of a LoRA checkpoint (fp32) and where they were read from."""

    tensors: dict[str, torch.Tensor]
    origin: str  # e.g. "the fp32 master copy (ZeRO-3 optimizer files)"


def _module_shards(step: Path, tp: int) -> dict[str, dict[int, torch.Tensor]]:
    """``{name: {tp_rank: shard}}`` of the adapters in the model files (ZeRO-0/1/2, with or without a pipeline)."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(step.glob("*model_states.pt")):
        m = _TP_RANK.search(f.name)
        if m is None or f.name.startswith("zero_pp_rank_"):
            continue
        state = safe_torch_load(f, mmap=True)
        module = state.get("module", state) if isinstance(state, dict) else {}
        for local, t in (module or {}).items():
            name = original_name(local)
            if is_lora_name(name) and isinstance(t, torch.Tensor):
                shards.setdefault(name, {})[int(m.group(1)) % tp] = t.detach().float()
    return shards


def _layout_expert(layout: ModelLayout, name: str) -> int | None:
    """The expert dimension of adapter ``name``'s linear weight (``None``: not a routed expert's)."""
    spec = layout.tensors.get(name.rpartition(".lora.")[0] + ".weight")
    return None if spec is None else spec.expert_dim


def _expert_shards(step: Path, tp: int, ep: int) -> dict[str, dict[int, torch.Tensor]]:
    """``{name: {tp_rank: shard}}`` of the routed experts' adapters of an expert-parallel run: each tensor-parallel
    rank's ``experts/pp00_tp{T}_ep{E}.pt`` files joined over the expert ranks (expert axis 0)."""
    from megatron_glm.checkpoint.experts import expert_file

    parts: dict[str, dict[int, list[torch.Tensor]]] = {}
    for t in range(tp):
        for e in range(ep):
            path = step / expert_file((0, t, e, 0))
            if not path.is_file():
                raise CheckpointError(f"{step}: no expert shard {path.name} (expert-parallel LoRA checkpoint)")
            for local, v in safe_torch_load(path).items():
                if is_lora_name(original_name(local)):
                    parts.setdefault(original_name(local), {}).setdefault(t, []).append(v.detach().float())
    return {n: {t: torch.cat(v, dim=0) for t, v in by_tp.items()} for n, by_tp in parts.items()}


def _zero_readers(step: Path, tp: int, pp: int, dp: int, stage: int) -> list[ZeroReader]:
    """Per tensor-parallel rank, the reader of the fp32 master copies (``[]``: the checkpoint has none)."""
    from megatron_glm.checkpoint.formats.native import model_file, optim_files, pipeline_zero_readers

    if stage == 0:
        return []
    if pp > 1:
        return pipeline_zero_readers(step, tp, pp, dp)
    readers = []
    for t in range(tp):
        files = optim_files(step, t, dp)
        states = model_file(step, t, stage)
        if not files or not all(f.is_file() for f in files) or not states.is_file():
            if stage == 3:
                raise CheckpointError(
                    f"{step}: ZeRO-3 LoRA checkpoint without its optimizer files (the adapters live there)"
                )
            return []
        shapes = safe_torch_load(states, mmap=True).get("param_shapes")
        if not shapes:
            return []
        renamed = [OrderedDict((original_name(n), v) for n, v in g.items()) for g in shapes]
        readers.append(ZeroReader(files, renamed))
    return readers


def read_adapter_set(step: Path, layout: ModelLayout) -> AdapterSet:
    """The full adapters of LoRA checkpoint ``step`` (any tp/pp/dp layout, ZeRO-0/1/2/3, expert parallelism without
    a pipeline), fp32."""
    lay: dict[str, Any] = read_meta(step).get("layout") or {}
    tp, pp, dp, stage = (int(lay.get(k, d)) for k, d in (("tp", 1), ("pp", 1), ("dp", 1), ("zero_stage", 0)))
    ep = int(lay.get("ep", 1))
    if ep > 1 and pp > 1:
        raise CheckpointError(f"{step}: LoRA adapters of a run with expert and pipeline parallelism cannot be read")
    readers = [] if ep > 1 else _zero_readers(step, tp, pp, dp, stage)
    if ep > 1:  # the routed experts' adapters from each expert rank's file, the others from the model files
        shards = {n: s for n, s in _module_shards(step, tp).items() if _layout_expert(layout, n) is None}
        shards.update(_expert_shards(step, tp, ep))
        origin = "the model files and each expert rank's experts/ file (expert-parallel run: the training dtype)"
    elif readers:
        names = [n for n in readers[0].names if is_lora_name(n)]
        shards = {n: {t: r.fp32(n) for t, r in enumerate(readers)} for n in names}
        origin = f"the fp32 master copy (ZeRO-{stage} optimizer files)"
        for r in readers:
            r.release()
    else:
        shards = _module_shards(step, tp)
        origin = "the model files (no optimizer files with an fp32 master copy)"
    if not shards:
        raise CheckpointError(f"{step}: no LoRA adapters in its model or optimizer files")
    for name in shards:
        linear = name.rpartition(".lora.")[0]
        if f"{linear}.weight" not in layout:
            raise CheckpointError(f"{step}: adapter {name} is on no linear of the base model ({linear}.weight)")
    full = {n: merge_shards(adapter_spec(layout, n), [s[r] for r in sorted(s)]) for n, s in shards.items()}
    return AdapterSet(full, origin)


def read_adapters(step: Path, layout: ModelLayout) -> dict[str, torch.Tensor]:
    """The full adapter tensors of LoRA checkpoint ``step`` (see :func:`read_adapter_set`)."""
    return read_adapter_set(step, layout).tensors


@dataclasses.dataclass
class LoraCheckpoint:
    """A LoRA run's step directory: its ``meta.json``'s ``lora`` record and config, and its base's path."""

    step: Path
    meta: dict[str, Any]
    record: dict[str, Any]
    base_path: Path

    @property
    def dropout(self) -> float:
        return float(((self.meta.get("config") or {}).get("lora") or {}).get("dropout", 0.0))


def open_lora(path: str | Path, flag: str) -> LoraCheckpoint:
    """The LoRA checkpoint ``path`` (a ``--save`` directory or a step), its base present and unchanged since
    training. ``flag``: the option that asked for it (named in the errors)."""
    from megatron_glm.checkpoint.formats.native import find_step_dir

    step = find_step_dir(Path(path))
    meta = read_meta(step)
    record = meta.get("lora")
    if not record:
        raise CheckpointError(f"{step}: not a LoRA checkpoint (its meta.json records no lora); {flag} needs one")
    base_path = Path(record["base"])
    if not base_path.exists():
        raise CheckpointError(f"{step}: its LoRA base {base_path} is gone; the adapters cannot be used without it")
    if base_identity(base_path) != record["base_sha256"]:
        raise CheckpointError(
            f"{step}: its LoRA base {base_path} has changed since training (manifest sha256 differs); "
            "the adapters belong to the original base"
        )
    return LoraCheckpoint(step, meta, record, base_path)
