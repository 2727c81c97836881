"""All-to-all expert dispatch: EP ranks with their experts equal the local dispatcher holding every expert on one
process (fp32): outputs and gradients of the tokens, the routing weights and the experts, with the weights applied
by the combine or sent along to the rows (``row_weights``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.model.moe_dispatch import LocalDispatcher
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.expert_dispatch import ExpertDispatcher
from megatron_glm.testing import run_distributed

E, K, H, FF, N = 8, 2, 6, 5, 7  # experts, top-k, hidden, expert intermediate, tokens per rank


def _problem(world: int) -> dict[str, torch.Tensor]:
    """Every rank's tokens, routing and weights (the same on every process), with empty experts and empty sends:
    expert 0 is never chosen, and rank 1's tokens only go to the last rank's experts."""
    g = torch.Generator().manual_seed(1234 + world)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] + 1 for _ in range(N * world)])
    last = E - E // world
    ids[N : 2 * N] = torch.stack([torch.randperm(E // world, generator=g)[:K] + last for _ in range(N)])
    return {
        "x": torch.randn(N * world, H, generator=g),
        "ids": ids,
        "weights": torch.rand(N * world, K, generator=g),
        "w1": torch.randn(E, 2 * FF, H, generator=g) * 0.3,
        "w2": torch.randn(E, H, FF, generator=g) * 0.3,
        "probe": torch.randn(N * world, H, generator=g),
    }


def _experts(xg: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each local expert on its rows (``w1`` packs ``[W_gate; W_up]``)."""
    out = []
    for e, rows in enumerate(torch.split(xg, counts.tolist())):
        gate, up = (rows @ w1[e].t()).chunk(2, dim=-1)
        out.append((F.silu(gate) * up) @ w2[e].t())
    return torch.cat(out)


def _run(dispatcher: ExpertDispatcher, p: dict, rows: slice, experts: slice) -> dict[str, torch.Tensor]:
    x = p["x"][rows].clone().requires_grad_()
    weights = p["weights"][rows].clone().requires_grad_()
    w1 = p["w1"][experts].clone().requires_grad_()
    w2 = p["w2"][experts].clone().requires_grad_()
    xg, counts, handle = dispatcher.dispatch(x, p["ids"][rows])
    assert int(counts.sum()) == xg.shape[0] and counts.numel() == w1.shape[0]
    out = dispatcher.combine(_experts(xg, counts, w1, w2), handle, weights)
    (out * p["probe"][rows]).sum().backward()
    res = {"out": out.detach(), "x": x.grad, "weights": weights.grad, "w1": w1.grad, "w2": w2.grad, "m": xg.shape[0]}
    # the MoE layer's way: each row weighed where it is computed (row_weights), the rows summed (combine, None)
    x.grad = weights.grad = w1.grad = w2.grad = None
    xg, counts, handle = dispatcher.dispatch(x, p["ids"][rows])
    rw = dispatcher.row_weights(weights, handle)
    out = dispatcher.combine(_experts(xg, counts, w1, w2) * rw.unsqueeze(-1), handle, None)
    (out * p["probe"][rows]).sum().backward()
    for key, got in (("out", out.detach()), ("x", x.grad), ("weights", weights.grad), ("w1", w1.grad), ("w2", w2.grad)):
        torch.testing.assert_close(got, res[key], rtol=0, atol=1e-6, msg=f"weighted rows: {key}")
    return res


def _ep_rank(rank: int, world: int) -> dict:
    ps = initialize_parallel_state(ep_size=world)
    assert ps.ep_rank == rank and ps.ep_group is not None
    local = E // world
    return _run(
        ExpertDispatcher(E, ps),
        _problem(world),
        slice(rank * N, (rank + 1) * N),
        slice(rank * local, (rank + 1) * local),
    )


def _dense_reference(p: dict) -> torch.Tensor:
    """The routed output written per token: sum_j w_j expert_{id_j}(x)."""
    out = torch.zeros_like(p["x"])
    for t in range(p["x"].shape[0]):
        for j in range(K):
            e = int(p["ids"][t, j])
            gate, up = (p["w1"][e] @ p["x"][t]).chunk(2)
            out[t] += p["weights"][t, j] * (p["w2"][e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_dispatch_equals_every_expert_on_one_process(world: int) -> None:
    p = _problem(world)
    full = _run(LocalDispatcher(E), p, slice(None), slice(None))  # the MoE layer's dispatcher, every expert
    torch.testing.assert_close(full["out"], _dense_reference(p), rtol=0, atol=1e-6)
    alone = _run(ExpertDispatcher(E, ParallelState()), p, slice(None), slice(None))  # EP = 1: no communication
    for key in ("out", "x", "weights", "w1", "w2"):
        torch.testing.assert_close(alone[key], full[key], rtol=0, atol=1e-6)
    assert full["w1"][0].abs().max() == 0  # expert 0 chose by no token: staged, so its rows are really empty
    results = run_distributed(_ep_rank, world)
    local = E // world
    for r, res in enumerate(results):
        rows, experts = slice(r * N, (r + 1) * N), slice(r * local, (r + 1) * local)
        for key, want in (("out", full["out"][rows]), ("x", full["x"][rows]), ("weights", full["weights"][rows])):
            torch.testing.assert_close(res[key], want, rtol=0, atol=1e-6, msg=f"rank {r} {key}")
        for key in ("w1", "w2"):  # each rank's experts get the gradient of every rank's tokens routed to them
            torch.testing.assert_close(res[key], full[key][experts], rtol=0, atol=1e-6, msg=f"rank {r} {key}")
        assert res["m"] == int((p["ids"] // local == r).sum())  # no token dropped: every copy routed here arrives
    assert sum(res["m"] for res in results) == N * world * K


def test_dispatcher_refuses_experts_not_divisible() -> None:
    with pytest.raises(ValueError, match="7 experts do not split over 2 expert-parallel ranks"):
        ExpertDispatcher(7, ParallelState(dp_size=2, ep_size=2))
