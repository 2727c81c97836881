"""fp32 ZeRO-0 clipping counts each parameter once (one process; the multi-rank sums: test_pipeline's PP=1
equality with clipping on)."""

from __future__ import annotations

import math

import torch

from megatron_glm.parallel import ParallelState
from megatron_glm.training.grad_clip import clip_by_global_norm, global_grad_norm


def _param(grad: list[float], **attrs: bool) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad)
    for name, value in attrs.items():
        setattr(p, name, value)
    return p


def test_replicas_and_tensor_parallel_duplicates_counted_once() -> None:
    shard = _param([3.0, 0.0], tensor_model_parallel=True)
    duplicate = _param([4.0])  # a norm weight on every tensor-parallel rank
    tied_copy = _param([12.0], ds_pipe_replicated=True)  # the last stage's copy of the word embedding
    frozen = torch.nn.Parameter(torch.ones(3))  # no gradient
    params = [shard, duplicate, tied_copy, frozen]
    assert float(global_grad_norm(params, ParallelState())) == 5.0  # rank 0 of the group: the duplicate counts
    assert float(global_grad_norm(params, ParallelState(tp_rank=1))) == 3.0  # another tensor-parallel rank: not


def test_clip_scales_every_gradient_by_the_counted_norm() -> None:
    params = [_param([3.0, 0.0], tensor_model_parallel=True), _param([4.0]), _param([12.0], ds_pipe_replicated=True)]
    norm = clip_by_global_norm(params, 1.0, ParallelState())
    assert float(norm) == 5.0
    coef = 1.0 / (5.0 + 1e-6)
    for p, before in zip(params, ([3.0, 0.0], [4.0], [12.0]), strict=True):
        assert torch.allclose(p.grad, torch.tensor(before) * coef)  # replicas too: they stay equal
    untouched = [_param([0.3]), _param([0.4])]
    assert math.isclose(float(clip_by_global_norm(untouched, 1.0, ParallelState())), 0.5, rel_tol=1e-6)
    assert torch.equal(untouched[0].grad, torch.tensor([0.3]))  # under max_norm: no scaling
