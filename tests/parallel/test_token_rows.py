"""The MoE row helpers: the combine from expert-sorted rows (dropped pairs included) against an fp64 reference,
the un-permutation's gather backward, and the grouped SwiGLU's fused backward against autograd's (bitwise)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.model.moe import _SwiGLU
from megatron_glm.parallel.token_rows import combine_sorted, unpermute_rows


def _sorted_pairs(n: int, k: int, experts: int, drop: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])
    order = torch.argsort(ids.reshape(-1), stable=True)
    return order[: order.numel() - drop]


@pytest.mark.parametrize("drop", [0, 7])
def test_combine_sorted_equals_fp64_reference(drop):
    n, k, h = 40, 3, 16
    order = _sorted_pairs(n, k, 6, drop)
    rows = torch.randn(order.numel(), h, requires_grad=True)
    weights = torch.rand(n, k, requires_grad=True)
    grad = torch.randn(n, h)
    out = combine_sorted(rows, order, weights, k)
    out.backward(grad)
    rows64 = rows.detach().double().requires_grad_()
    weights64 = weights.detach().double().requires_grad_()
    pairs = torch.zeros(n * k, h, dtype=torch.float64).index_copy(0, order, rows64).view(n, k, h)
    ref = (pairs * weights64.unsqueeze(-1)).sum(1)
    ref.backward(grad.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.grad.double(), rows64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.grad.double(), weights64.grad, rtol=1e-5, atol=1e-6)
    if drop:  # a dropped pair's weight gets no gradient
        dropped = torch.ones(n * k, dtype=torch.bool)
        dropped[order] = False
        assert dropped.sum() == drop and (weights.grad.reshape(-1)[dropped] == 0).all()


def test_combine_sorted_bf16_rows_give_bf16():
    order = _sorted_pairs(8, 2, 4, 0)
    rows = torch.randn(order.numel(), 8, dtype=torch.bfloat16)
    weights = torch.rand(8, 2)
    out = combine_sorted(rows, order, weights, 2)
    ref = combine_sorted(rows.float(), order, weights, 2)  # the same fp32 products and sums
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))


def test_unpermute_rows_round_trip_and_gradient():
    order = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    x = torch.randn(30, 5)
    y = x[order].requires_grad_()
    back = unpermute_rows(y, order)
    assert torch.equal(back, x)
    grad = torch.randn(30, 5)
    back.backward(grad)
    assert torch.equal(y.grad, grad[order])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_swiglu_matches_autograd_bitwise(dtype):
    h = torch.randn(33, 2 * 12, dtype=dtype, requires_grad=True)
    grad = torch.randn(33, 12, dtype=dtype)
    gate, up = h.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    ref.backward(grad)
    ref_grad, h.grad = h.grad.clone(), None
    out = _SwiGLU.apply(h)
    out.backward(grad)
    assert torch.equal(out, ref) and torch.equal(h.grad, ref_grad)
