"""Gradient clipping of DeepSpeed's fp32 ZeRO-0 path with every parameter counted once, as Megatron counts it.

DeepSpeed 0.19's ``clip_grad_norm_`` (what the engine's ``clip_fp32_gradients`` calls when neither ZeRO, bf16 nor
fp16 is on) reduces the norm over the pipeline grid's "model parallel" group (every stage and tensor-parallel rank
of a replica) but counts a parameter that is not tensor-parallel only on that group's rank 0 (the first stage's):
under pipeline parallelism the later stages' whole-tensor parameters drop out of the norm (all of them at TP=1),
and ``ds_pipe_replicated`` is not read (a tensor-parallel shard of the tied word embedding counts on the first and
the last stage). Its ZeRO and bf16 optimizers count right. :func:`global_grad_norm` counts a tensor-parallel shard
on every tensor-parallel rank, a tensor-parallel duplicate (norms, biases) on tensor-parallel rank 0 only, a
pipeline replica once, and sums over the tensor- and pipeline-parallel groups (ZeRO-0 is refused with expert
parallelism: no expert-parallel sums); :func:`count_each_parameter_once` makes an engine clip (and report,
``get_global_grad_norm``) with it.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.parallel import ParallelState

__all__ = ["count_each_parameter_once", "global_grad_norm"]


def _counted(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """Whether this rank adds ``param``'s gradient to the norm: not a pipeline replica, and a tensor-parallel shard
    or (a duplicate on every tensor-parallel rank) on tensor-parallel rank 0."""
    if param.grad is None or getattr(param, "ds_pipe_replicated", False):
        return False
    return tp_rank == 0 or bool(getattr(param, "tensor_model_parallel", False))


def global_grad_norm(params: Iterable[torch.nn.Parameter], parallel_state: ParallelState) -> torch.Tensor:
    """The 2-norm of the whole model's gradient, each parameter counted once (a collective over the tensor- and
    pipeline-parallel groups: every rank of a model replica calls it). Data- and context-parallel replicas hold the
    same reduced gradients, so one replica's norm is the norm. A 1-element fp32 tensor on the gradients' device."""
    ps = parallel_state
    grads = [p.grad.detach() for p in params if _counted(p, ps.tp_rank)]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros(1, dtype=torch.float32, device=device)
    for g in grads:
        total += g.float().pow(2).sum()
    for size, group in ((ps.tp_size, ps.tp_group), (ps.pp_size, ps.pp_group)):
        if size > 1:  # the pipeline group links equal tensor-parallel ranks: tp then pp sums the replica
            dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_by_global_norm(
    params: list[torch.nn.Parameter], max_norm: float, parallel_state: ParallelState
) -> torch.Tensor:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))`` (DeepSpeed's and torch's rule) with
    :func:`global_grad_norm`; replicas are scaled too (they stay equal). Returns the norm before clipping."""
    norm = global_grad_norm(params, parallel_state)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


def count_each_parameter_once(engine: Any, parallel_state: ParallelState) -> None:
    """Make a DeepSpeed engine's fp32 ZeRO-0 clipping use :func:`clip_by_global_norm` and keep its norm for
    ``engine.get_global_grad_norm()`` (DeepSpeed's own keeps none on that path). The engine calls
    ``clip_fp32_gradients`` only with clipping on and without ZeRO, bf16 or fp16, whose optimizers count right."""

    def clip_fp32_gradients(self: Any) -> None:
        params = list(self.module.parameters())
        self._global_grad_norm = clip_by_global_norm(params, self.gradient_clipping(), parallel_state)

    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)
