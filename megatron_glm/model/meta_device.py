"""A model built on the meta device, then given storage: for a model whose every parameter is about to be loaded,
so no random init is drawn (weights-only starts, resumes, generation, pipeline stages); and a parameter made
writable whole when ZeRO-3 partitions it (:func:`writable`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def materialize(model: nn.Module, device: torch.device | str | None) -> nn.Module:
    """Uninitialised storage on ``device`` (``None``: the host) for ``model`` built on the meta device, for a
    model whose every parameter is about to be loaded: no random init is drawn. The parameters keep their
    attributes (tensor-parallel partitioning, which ``to_empty`` alone drops). Buffers are zeroed: a persistent
    one is loaded with the parameters, and a non-persistent one (the router's per-expert ``load`` counts) is not
    in any checkpoint, so it must start from zeros as built, not from uninitialised memory."""
    attributes = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.to_empty(device=device if device is not None else "cpu")
    for name, p in model.named_parameters():
        vars(p).update(attributes[name])
    with torch.no_grad():
        for b in model.buffers():
            b.zero_()
    return model


def writable(param: nn.Parameter) -> contextlib.AbstractContextManager:
    """A context in which ``param`` holds this tensor-parallel rank's whole value and writes to it are kept: under
    ZeRO-3 (a model built in ``deepspeed.zero.Init``) it is gathered, then re-partitioned from rank 0's copy (every
    rank writes the same); otherwise nothing."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
