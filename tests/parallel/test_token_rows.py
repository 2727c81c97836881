"""The MoE row helpers: the combine from expert-sorted rows (dropped pairs included) and the sum of rows already
weighted against fp64 references, the un-permutation's gather backward, and the grouped SwiGLU's fused backward
against autograd's (bitwise), with the routing weights folded in and writing into its input (against fp64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.model.moe import _SwiGLU
from megatron_glm.parallel.token_rows import combine_sorted, sum_sorted, unpermute_rows


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


@pytest.mark.parametrize("drop", [0, 7])
def test_sum_sorted_equals_fp64_reference(drop):
    n, k, h = 40, 3, 16
    order = _sorted_pairs(n, k, 6, drop)
    rows = torch.randn(order.numel(), h, requires_grad=True)
    grad = torch.randn(n, h)
    out = sum_sorted(rows, order, k, n)
    out.backward(grad)
    rows64 = rows.detach().double().requires_grad_()
    ref = torch.zeros(n * k, h, dtype=torch.float64).index_copy(0, order, rows64).view(n, k, h).sum(1)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows.grad.double(), rows64.grad, rtol=0, atol=0)  # each row its token's gradient
    bf16 = sum_sorted(rows.detach().bfloat16(), order, k, n)  # summed in fp32, rounded once
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, sum_sorted(rows.detach().bfloat16().float(), order, k, n).bfloat16())


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


def _swiglu64(h, w, grad):
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    gate, up = h64.chunk(2, dim=-1)
    out = F.silu(gate) * up * w64.unsqueeze(-1)
    out.backward(grad.double())
    return out, h64.grad, w64.grad


@pytest.mark.parametrize("reuse", [False, True])
def test_grouped_swiglu_with_routing_weights_equals_fp64_reference(reuse):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(33, 2 * 12, generator=g, requires_grad=True)
    w = torch.rand(33, generator=g, requires_grad=True)
    grad = torch.randn(33, 12, generator=g)
    ref, ref_h, ref_w = _swiglu64(base, w, grad)
    h = base * 1.0  # an intermediate, as the grouped matmul's output
    out = _SwiGLU.apply(h, w, reuse)
    out.backward(grad)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(base.grad.double(), ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), ref_w, rtol=1e-5, atol=1e-6)
    assert torch.equal(h, base.grad) == reuse  # with reuse the gradient was written into h itself


def test_grouped_swiglu_writing_into_its_input_refuses_a_second_backward():
    h = torch.randn(5, 8, requires_grad=True) * 1.0
    out = _SwiGLU.apply(h, torch.rand(5), True)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        out.sum().backward()
