"""Is a training state worth saving? Every weight and optimizer-state tensor finite (checked at save time only).

A learning rate far too high can make the weights NaN or infinite through an update that followed a finite
loss; saving them would write a useless checkpoint, and pruning would then delete the good ones. One host
synchronisation per save (a flag per kind, reduced on the device), none per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if torch.is_tensor(obj):
        if obj.is_floating_point() and obj.numel():
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def weight_tensors(engine: Any) -> list[torch.Tensor]:
    """The parameters of the module the engine wraps (this rank's shards)."""
    module = getattr(engine, "module", None)
    return [p.detach() for p in module.parameters()] if module is not None else []


def optimizer_tensors(engine: Any) -> list[torch.Tensor]:
    """The torch optimizer's parameters (ZeRO's fp32 partitions, or the master weights) and its state (moments)."""
    opt = getattr(engine, "optimizer", None)
    base = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO / bf16 / fp16 wrappers hold the torch optimizer
    if base is None or not hasattr(base, "param_groups"):
        return []
    params = [p.detach() for g in base.param_groups for p in g["params"]]
    return [*_tensors(params), *_tensors(list(getattr(base, "state", {}).values()))]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Every element of every tensor is finite; one host synchronisation per device holding them."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def nonfinite_parts(engine: Any, all_ok: Any) -> list[str]:
    """Which of "model weights" / "optimizer state" hold NaN or inf on any rank (``all_ok`` agrees a bool)."""
    weights = weight_tensors(engine)
    shared = {(t.device, t.data_ptr()) for t in weights}  # a plain torch optimizer updates the module's own
    own = [t for t in optimizer_tensors(engine) if (t.device, t.data_ptr()) not in shared]
    out = []
    for name, tensors in (("model weights", weights), ("optimizer state", own)):
        if not all_ok(all_finite(tensors)):
            out.append(name)
    return out
