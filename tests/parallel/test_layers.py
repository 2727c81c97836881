"""Tensor-parallel mappings and layers at TP = 1, 2, 4 against the dense (unsharded) reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_glm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    initialize_parallel_state,
    normal_init,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
    shard,
    unshard,
    vocab_parallel_cross_entropy,
)
from megatron_glm.testing import run_distributed

ATOL = 1e-5


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff}"


def _check_mappings(rank: int, world: int) -> dict:
    ps = initialize_parallel_state(tp_size=world)
    g = ps.tp_group
    # copy-to: identity forward, all-reduce backward. Dense op: sum_r <x, w_r>.
    x = _rand(3, 8, seed=0).requires_grad_()
    ws = [_rand(3, 8, seed=10 + r) for r in range(world)]
    (copy_to_tensor_parallel_region(x, g) * ws[rank]).sum().backward()
    xd = x.detach().clone().requires_grad_()
    sum((xd * w).sum() for w in ws).backward()
    _close(x.grad, xd.grad, "copy grad")
    # reduce-from: all-reduce forward, identity backward. Dense op: sum_r x_r.
    xs = [_rand(3, 8, seed=20 + r).requires_grad_() for r in range(world)]
    gout = _rand(3, 8, seed=30)
    y = reduce_from_tensor_parallel_region(xs[rank], g)
    (y * gout).sum().backward()
    dense_in = [t.detach().clone().requires_grad_() for t in xs]
    yd = sum(dense_in)
    (yd * gout).sum().backward()
    _close(y, yd, "reduce fwd")
    _close(xs[rank].grad, dense_in[rank].grad, "reduce grad")
    # scatter-to: keep the last-dim slice; dense op: slicing the full tensor, each rank's loss summed.
    x = _rand(3, 4 * world, seed=40).requires_grad_()
    gouts = [_rand(3, 4, seed=50 + r) for r in range(world)]
    y = scatter_to_tensor_parallel_region(x, g)
    (y * gouts[rank]).sum().backward()
    xd = x.detach().clone().requires_grad_()
    sum((part * go).sum() for part, go in zip(torch.chunk(xd, world, -1), gouts)).backward()
    _close(y, xd.detach().chunk(world, -1)[rank], "scatter fwd")
    _close(x.grad, xd.grad, "scatter grad")
    # gather-from: concat of every rank's slice; dense op: concatenation.
    xs = [_rand(3, 4, seed=60 + r).requires_grad_() for r in range(world)]
    gout = _rand(3, 4 * world, seed=70)
    y = gather_from_tensor_parallel_region(xs[rank], g)
    (y * gout).sum().backward()
    dense_in = [t.detach().clone().requires_grad_() for t in xs]
    (torch.cat(dense_in, -1) * gout).sum().backward()
    _close(y, torch.cat([t.detach() for t in xs], -1), "gather fwd")
    _close(xs[rank].grad, dense_in[rank].grad, "gather grad")
    return {"rank": ps.tp_rank}


def _check_layers(rank: int, world: int) -> dict:
    ps = initialize_parallel_state(tp_size=world)
    h, out, vocab = 8, 12, 16 * world
    x = _rand(2, 5, h, seed=1)
    # Column-parallel (with stride 3, as for fused QKV) with and without gather_output.
    for gather, stride in ((False, 1), (True, 1), (False, 3)):
        layer = ColumnParallelLinear(
            h, out, gather_output=gather, stride=stride, init_method=normal_init(0.5, 7), parallel_state=ps
        )
        dense = torch.nn.Linear(h, out)
        with torch.no_grad():
            normal_init(0.5, 7)(dense.weight)
            dense.bias.copy_(_rand(out, seed=8))
            layer.bias.copy_(shard(dense.bias, 0, ps.tp_rank, ps.tp_size, stride))
        gout = _rand(2, 5, out, seed=9)
        xi, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, yd = layer(xi), dense(xd)
        local_g = gout if gather else shard(gout, -1, ps.tp_rank, ps.tp_size, stride)
        (y * local_g).sum().backward()
        (yd * gout).sum().backward()
        _close(y, yd if gather else shard(yd.detach(), -1, ps.tp_rank, ps.tp_size, stride), "column fwd")
        _close(xi.grad, xd.grad, "column input grad")
        _close(layer.weight.grad, shard(dense.weight.grad, 0, ps.tp_rank, ps.tp_size, stride), "column w grad")
        _close(layer.bias.grad, shard(dense.bias.grad, 0, ps.tp_rank, ps.tp_size, stride), "column b grad")
    # Row-parallel, input full or already split.
    for parallel_in in (False, True):
        layer = RowParallelLinear(
            out, h, input_is_parallel=parallel_in, init_method=normal_init(0.5, 11), parallel_state=ps
        )
        dense = torch.nn.Linear(out, h)
        with torch.no_grad():
            normal_init(0.5, 11)(dense.weight)
            dense.bias.copy_(_rand(h, seed=12))
            layer.bias.copy_(dense.bias)
        xin = _rand(2, 5, out, seed=13)
        gout = _rand(2, 5, h, seed=14)
        xi = (shard(xin, -1, ps.tp_rank, ps.tp_size) if parallel_in else xin).clone().requires_grad_()
        xd = xin.clone().requires_grad_()
        y, yd = layer(xi), dense(xd)
        (y * gout).sum().backward()
        (yd * gout).sum().backward()
        _close(y, yd, "row fwd")
        _close(xi.grad, shard(xd.grad, -1, ps.tp_rank, ps.tp_size) if parallel_in else xd.grad, "row input grad")
        _close(layer.weight.grad, shard(dense.weight.grad, 1, ps.tp_rank, ps.tp_size), "row w grad")
        _close(layer.bias.grad, dense.bias.grad, "row b grad")
    # Vocab-parallel embedding.
    emb = VocabParallelEmbedding(vocab, h, init_method=normal_init(1.0, 15), parallel_state=ps)
    dense_w = torch.empty(vocab, h)
    normal_init(1.0, 15)(dense_w)
    dense_w.requires_grad_()
    ids = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(16))
    gout = _rand(3, 7, h, seed=17)
    (emb(ids) * gout).sum().backward()
    yd = F.embedding(ids, dense_w)
    (yd * gout).sum().backward()
    _close(emb(ids), yd, "embedding fwd")
    _close(emb.weight.grad, shard(dense_w.grad, 0, ps.tp_rank, ps.tp_size), "embedding grad")
    # Vocab-parallel cross entropy, with and without label smoothing.
    logits = _rand(4, 6, vocab, seed=18) * 3
    target = torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(19))
    weights = _rand(4, 6, seed=20)
    for eps in (0.0, 0.1):
        local = shard(logits, -1, ps.tp_rank, ps.tp_size).detach().clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, ps.tp_group, label_smoothing=eps)
        (loss * weights).sum().backward()
        full = logits.clone().requires_grad_()
        ref = F.cross_entropy(full.view(-1, vocab), target.view(-1), reduction="none", label_smoothing=eps)
        (ref.view(4, 6) * weights).sum().backward()
        _close(loss, ref.view(4, 6), f"cross entropy eps={eps}")
        _close(local.grad, shard(full.grad, -1, ps.tp_rank, ps.tp_size), f"cross entropy grad eps={eps}")
        assert torch.equal(local, shard(logits, -1, ps.tp_rank, ps.tp_size))  # fp32 logits are not overwritten
        # bf16 logits: their fp32 copy is shifted and exponentiated in place; the same values as fp32 logits
        low = shard(logits, -1, ps.tp_rank, ps.tp_size).to(torch.bfloat16).requires_grad_()
        as_fp32 = low.detach().float().requires_grad_()
        for x in (low, as_fp32):
            (vocab_parallel_cross_entropy(x, target, ps.tp_group, label_smoothing=eps) * weights).sum().backward()
        assert torch.equal(low.grad, as_fp32.grad.to(torch.bfloat16)), f"bf16 cross entropy grad eps={eps}"
    return {}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mappings_match_dense_autograd(tp: int) -> None:
    results = run_distributed(_check_mappings, tp)
    assert [r["rank"] for r in results] == list(range(tp))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layers_match_dense(tp: int) -> None:
    run_distributed(_check_layers, tp)


def test_layers_without_process_group() -> None:
    """World size 1 works with no process group at all."""
    assert not dist.is_initialized()
    _check_layers_single()


def _check_layers_single() -> None:
    layer = ColumnParallelLinear(4, 6, init_method=normal_init(0.1, 3))
    dense = torch.empty(6, 4)
    normal_init(0.1, 3)(dense)
    torch.testing.assert_close(layer.weight.detach(), dense, rtol=0, atol=0)
    x = _rand(2, 4, seed=4)
    torch.testing.assert_close(layer(x), x @ dense.T, rtol=0, atol=ATOL)


def test_qkv_stride_layout() -> None:
    """A fused [Q; K; V] weight shards per rank as [Q_r; K_r; V_r] and joins back exactly."""
    h, tp = 4, 2
    q, k, v = (torch.full((h, h), float(i)) + torch.arange(h).unsqueeze(1) for i in (100, 200, 300))
    full = torch.cat([q, k, v])
    r1 = shard(full, 0, 1, tp, stride=3)
    torch.testing.assert_close(r1, torch.cat([q[2:], k[2:], v[2:]]))
    assert not torch.equal(torch.cat([shard(full, 0, r, tp, 3) for r in range(tp)]), full)
    torch.testing.assert_close(unshard([shard(full, 0, r, tp, 3) for r in range(tp)], 0, stride=3), full)


def test_shard_rejects_non_dividing() -> None:
    with pytest.raises(ValueError, match="does not split"):
        shard(torch.zeros(6, 2), 0, 0, 4)


def test_cross_entropy_backward_runs_once() -> None:
    """Backward turns the saved softmax into the gradient in place, so a second backward is refused, not wrong."""
    logits = torch.randn(3, 10, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([1, 2, 3])).sum()
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    torch.testing.assert_close(first, torch.softmax(logits.detach(), -1) - F.one_hot(torch.tensor([1, 2, 3]), 10))
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()
