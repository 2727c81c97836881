"""DeepSpeed ZeRO optimizer files: read per-parameter fp32 master weights and Adam moments, write ZeRO-1/2.

Layouts (DeepSpeed 0.19, ``parameter_alignment`` off), per tensor-parallel rank:

- ZeRO-1/2 (``zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt``): per param group, the parameters in
  group order are flattened into one vector, padded at the end to a multiple of ``2 x dp`` and cut into
  ``dp`` equal partitions. Each file holds its partition of the fp32 master weights (trailing padding
  removed) and the torch optimizer's state (``exp_avg``, ``exp_avg_sq`` of the padded partition).
- ZeRO-3: every parameter is partitioned on its own (``ceil(numel / dp)`` elements per rank); each rank's
  flat fp32 groups hold its pieces in parameter order. Only the fp32 master weights are read. A parameter outside
  the optimizer (an MoE router's correction bias) is in each rank's model-states file instead (:class:`FrozenReader`).

The order and shapes of the parameters come from ``param_shapes`` in the model-states file.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.errors import CheckpointError

ALIGNMENT_FACTOR = 2  # DeepSpeed's nccl_start_alignment_factor: groups are padded to a multiple of 2 x dp


def _range(parts: list[torch.Tensor], sizes: list[int], offset: int, numel: int) -> torch.Tensor:
    """Elements ``[offset, offset + numel)`` of the concatenation of ``parts`` (nominal lengths ``sizes``;
    a part may be shorter where it only drops trailing padding), without building the concatenation."""
    pieces = []
    k, base = 0, 0
    while numel > 0:
        while k < len(sizes) and offset >= base + sizes[k]:
            base += sizes[k]
            k += 1
        if k >= len(parts):
            raise CheckpointError("ZeRO partitions are shorter than the parameters they should hold")
        start = offset - base
        take = min(numel, sizes[k] - start)
        if parts[k].numel() < start + take:
            raise CheckpointError("ZeRO partitions are shorter than the parameters they should hold")
        pieces.append(parts[k].reshape(-1)[start : start + take])
        offset, numel = offset + take, numel - take
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _base_state(osd: dict[str, Any], group: int) -> dict[str, Any]:
    bos = osd["base_optimizer_state"]
    return bos["state"][group] if isinstance(bos, dict) else bos[group]


class ZeroReader:
    """The ZeRO optimizer files of one tensor-parallel rank (every data-parallel partition), memory-mapped."""

    def __init__(self, files: list[Path], param_shapes: list[dict[str, Any]]) -> None:
        self.files = files
        self.param_shapes = [OrderedDict((k, torch.Size(v)) for k, v in g.items()) for g in param_shapes]
        self._sds: list[dict[str, Any]] | None = None
        osd = self._states()[0]
        self.stage = int(osd.get("zero_stage", 0))
        self.dp = len(files)
        count = osd.get("partition_count", self.dp)
        count = max(count) if isinstance(count, list) else count
        if count != self.dp:
            raise CheckpointError(
                f"{files[0].parent}: ZeRO files say {count} data-parallel partitions but {self.dp} files were found"
            )
        pads = osd.get("param_alignment_paddings")
        if pads and any(any(p) for p in pads):
            raise CheckpointError(
                f"{files[0]}: ZeRO parameter_alignment padding is not supported; save "
                f"without zero_optimization.parameter_alignment"
            )
        self._index = self._build_index()

    def _states(self) -> list[dict[str, Any]]:
        if self._sds is None:
            self._sds = [safe_torch_load(f, mmap=True)["optimizer_state_dict"] for f in self.files]
        return self._sds

    def release(self) -> None:
        """Unmap the files (they are mapped again on the next access)."""
        self._sds = None

    def _build_index(self) -> dict[str, tuple[int, int, torch.Size]]:
        index: dict[str, tuple[int, int, torch.Size]] = {}
        offset = 0
        for g, shapes in enumerate(self.param_shapes):
            if self.stage < 3:
                offset = 0
            for name, shape in shapes.items():
                index[name] = (g, offset, shape)
                offset += shape.numel() if self.stage < 3 else math.ceil(shape.numel() / self.dp)
        return index

    @property
    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        """Whether the optimizer holds ``name`` (a parameter without gradient, as an MoE router's correction bias,
        is in the model files only)."""
        return name in self._index

    @property
    def has_moments(self) -> bool:
        return self.stage in (1, 2)

    def _partition_size(self, g: int, first: int = 0) -> int:
        osd = self._states()[first]
        return osd["single_partition_of_fp32_groups"][g].numel() + osd["group_paddings"][g]

    def _selected(self, ranks: list[int] | None) -> list[dict[str, Any]]:
        sds = self._states()
        return sds if ranks is None else [sds[r] for r in ranks]

    def fp32(self, name: str, ranks: list[int] | None = None) -> torch.Tensor:
        """This rank's fp32 master copy of ``name`` (its tensor-parallel shard). ``ranks``: the data-parallel
        files that partition its group, in partition order (an expert group's expert-data-parallel ranks;
        default all, ZeRO-1/2 only)."""
        g, offset, shape = self._lookup(name)
        sds = self._selected(ranks)
        if self.stage < 3:
            parts = [sd["single_partition_of_fp32_groups"][g] for sd in sds]
            size = self._partition_size(g, ranks[0] if ranks else 0)
            return _range(parts, [size] * len(sds), offset, shape.numel()).view(shape)
        per_rank = math.ceil(shape.numel() / self.dp)
        pieces = []
        for sd in sds:
            groups = list(sd["fp32_flat_groups"])
            pieces.append(_range(groups, [t.numel() for t in groups], offset, per_rank))
        return torch.cat(pieces)[: shape.numel()].view(shape)

    def moments(self, name: str, ranks: list[int] | None = None) -> dict[str, torch.Tensor]:
        """``exp_avg`` and ``exp_avg_sq`` of ``name`` (ZeRO-1/2 only; ``ranks`` as for :meth:`fp32`)."""
        if not self.has_moments:
            raise CheckpointError(f"{self.files[0]}: Adam moments of ZeRO stage {self.stage} cannot be read")
        g, offset, shape = self._lookup(name)
        sds = self._selected(ranks)
        sizes = [self._partition_size(g, ranks[0] if ranks else 0)] * len(sds)
        return {
            key: _range([_base_state(sd, g)[key] for sd in sds], sizes, offset, shape.numel()).view(shape)
            for key in ("exp_avg", "exp_avg_sq")
        }

    def step(self) -> Any:
        """The optimizer step count stored with group 0."""
        return _base_state(self._states()[0], 0).get("step")

    def global_state(self) -> dict[str, Any]:
        """The non-partitioned entries of dp rank 0's file (loss scaler, clip, param_groups, version, ...)."""
        osd = self._states()[0]
        keep = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "zero_stage", "ds_version")
        out = {k: osd[k] for k in keep if k in osd}
        bos = osd["base_optimizer_state"]
        out["param_groups"] = bos.get("param_groups") if isinstance(bos, dict) else None
        return out

    def _lookup(self, name: str) -> tuple[int, int, torch.Size]:
        if name not in self._index:
            raise CheckpointError(f"{self.files[0]}: the ZeRO state has no parameter {name}")
        return self._index[name]


class FrozenReader:
    """ZeRO-3's parameters outside the optimizer (an MoE router's correction bias) of one tensor-parallel rank:
    every data-parallel rank's model-states file holds its partition (``frozen_param_fragments``, padded to
    ``ceil(numel / dp)``) and the shape (``frozen_param_shapes``); ``module`` has an empty tensor there."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._parts: list[dict[str, Any]] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        """The whole (this tensor-parallel rank's) ``name``, in its saved dtype."""
        if self._parts is None:
            self._parts = [safe_torch_load(f, mmap=True) for f in self.files]
        shape = (self._parts[0].get("frozen_param_shapes") or {}).get(name)
        pieces = [(sd.get("frozen_param_fragments") or {}).get(name) for sd in self._parts]
        if shape is None or any(p is None for p in pieces):
            raise CheckpointError(
                f"{self.files[0]}: ZeRO-3 checkpoint without the partitions of {name} (frozen_param_fragments)"
            )
        numel = torch.Size(shape).numel()
        whole = torch.cat([p.reshape(-1) for p in pieces])
        if whole.numel() < numel:
            raise CheckpointError(f"{self.files[0].parent}: the ZeRO-3 partitions of {name} are shorter than it")
        return whole[:numel].view(shape)

    def release(self) -> None:
        self._parts = None


def zero12_partitions(group_numels: list[int], dp: int) -> list[tuple[int, int]]:
    """``(partition_size, total)`` per group: the padded flat group split into ``dp`` equal partitions."""
    out = []
    for total in group_numels:
        align = ALIGNMENT_FACTOR * dp
        padded = -(-total // align) * align
        out.append((padded // dp, total))
    return out


def write_zero12_file(
    path: Path,
    groups: list[list[tuple[str, torch.Size]]],
    dp_rank: int,
    dp: int,
    state_of: Callable[[str], dict[str, torch.Tensor]],
    global_state: dict[str, Any],
    step: Any,
    ds_config: Any,
    partitions: list[tuple[int, int]] | None = None,
) -> None:
    """Write data-parallel rank ``dp_rank``'s ZeRO-1/2 optimizer file for one tensor-parallel rank.

    ``groups``: per param group, ``(name, shard shape)`` in group order. ``state_of(name)`` returns this
    tensor-parallel rank's ``fp32`` / ``exp_avg`` / ``exp_avg_sq`` shards of the parameter. ``partitions``: per
    group, this file's ``(partition, count)`` (an expert group is partitioned over the expert-data-parallel
    ranks); default ``(dp_rank, dp)`` for every group.
    """
    from deepspeed.utils.tensor_fragment import fragment_address

    partitions = partitions or [(dp_rank, dp)] * len(groups)
    fp32_groups, paddings, states, mappings = [], [], {}, []
    for g, grp in enumerate(groups):
        rank, count = partitions[g]
        ((size, total),) = zero12_partitions([sum(s.numel() for _, s in grp)], count)
        lo, hi = rank * size, (rank + 1) * size
        bufs = {k: torch.zeros(size, dtype=torch.float32) for k in ("fp32", "exp_avg", "exp_avg_sq")}
        mapping: OrderedDict[str, Any] = OrderedDict()
        offset = 0
        for name, shape in groups[g]:
            n = shape.numel()
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                st = state_of(name)
                for key, buf in bufs.items():
                    buf[a - lo : b - lo] = st[key].reshape(-1)[a - offset : b - offset]
                mapping[name] = fragment_address(numel=b - a, start=a - lo)
            offset += n
        padding = size if total <= lo else (hi - total if total < hi else 0)
        fp32_groups.append(bufs["fp32"][: size - padding].clone())
        paddings.append(padding)
        states[g] = {
            "step": step.clone() if torch.is_tensor(step) else step,
            "exp_avg": bufs["exp_avg"],
            "exp_avg_sq": bufs["exp_avg_sq"],
        }
        mappings.append(mapping)
    param_groups = global_state.get("param_groups") or [{} for _ in groups]
    osd = {k: v for k, v in global_state.items() if k != "param_groups"}
    osd.update(
        {
            "base_optimizer_state": {
                "state": states,
                "param_groups": [{**pg, "params": [g]} for g, pg in enumerate(param_groups)],
            },
            "single_partition_of_fp32_groups": fp32_groups,
            "group_paddings": paddings,
            "param_alignment_paddings": [[0] * len(grp) for grp in groups],
            "partition_count": [count for _, count in partitions],
            "param_slice_mappings": mappings,
        }
    )
    torch.save({"optimizer_state_dict": osd, "ds_config": ds_config, "ds_version": osd.get("ds_version")}, path)
