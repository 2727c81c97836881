"""Context parallelism: CP=2 (and TP=2 x CP=2) gives the one-process loss and gradients, with GLM's blank-infilling
mask, document isolation, the causal objective, a rotary model, recomputation and dropout."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.model import GLMModel, batch_attention_mask, full_state_dict, masks, ring_attention
from megatron_glm.model.cp_attention import ContextParallelDropout, local_mask
from megatron_glm.model.masks import CAUSAL, sep_to_mask
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.context_parallel import (
    ContextParallel,
    reduce_loss,
    split_batch,
    split_sequence,
    zigzag_indices,
)
from megatron_glm.testing import run_distributed
from tests.model.helpers import FAMILY, make_batch, tiny_config


def _causal_batch(seed: int) -> dict:
    batch = make_batch(seed)
    b, s = batch["input_ids"].shape
    pos = torch.zeros(b, 2, s, dtype=torch.long)
    pos[:, 0] = torch.arange(s)
    return {**batch, "sep": torch.zeros(b, dtype=torch.long), "position_ids": pos, "loss_mask": torch.ones(b, s)}


def _batches() -> dict[str, dict]:
    batch = make_batch(11)  # seq 16: divisible by 2 x CP (and by TP for sequence parallelism)
    b, s = batch["input_ids"].shape
    docs = {**batch, "doc_ids": (torch.arange(s) // 6).expand(b, s).contiguous()}
    causal = _causal_batch(5)
    causal[CAUSAL] = True  # the trainer's host flag: the causal fast path at CP=1
    return {"blank": batch, "documents": docs, "causal": causal}


def _loss_grads(model: GLMModel, batch: dict, ps: ParallelState) -> dict[str, torch.Tensor]:
    """Loss and full gradients as the trainer gets them: this rank's positions, the loss reduced over the
    context-parallel group, the gradients averaged over it (DeepSpeed's data-parallel group is dp x cp)."""
    model.zero_grad(set_to_none=True)
    cp = ContextParallel.of(ps)
    if cp is not None:
        batch = split_batch(batch, cp.size, cp.rank)
    res = model(
        batch["input_ids"],
        batch["position_ids"],
        batch_attention_mask(batch),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    if cp is not None:
        res = reduce_loss(res, cp)
    res.loss.backward()
    if cp is not None:
        for p in model.parameters():
            dist.all_reduce(p.grad, group=cp.group)
            p.grad /= cp.size
    return {"loss": res.loss.detach().reshape(1), **full_state_dict(model, ps, grads=True)}


def _diff(got: dict, ref: dict) -> float:
    return max((got[k] - v).abs().max().item() for k, v in ref.items())


VARIANTS = {
    "plain": {},
    "rotary": FAMILY["chatglm2-6b"],
    "rope_2d": FAMILY["chatglm-6b"],
    "selective": {"recompute_granularity": "selective"},
    "full-recompute": {"checkpoint_activations": True},
    "fused-head": {"head_chunk_size": 5},
}


@contextlib.contextmanager
def _watch(seq: int):
    """Count the ring's exchanges; refuse to build a mask over the whole ``[seq, seq]`` grid."""
    hops = [0]
    exchange, materialize = ring_attention._Ring.exchange, masks.materialize

    def counted(self, *args, **kwargs):
        hops[0] += 1
        return exchange(self, *args, **kwargs)

    def local_only(*args, **kwargs):
        out = materialize(*args, **kwargs)
        assert tuple(out.shape[-2:]) != (seq, seq), "a full [S, S] mask was built under context parallelism"
        return out

    ring_attention._Ring.exchange, masks.materialize = counted, local_only
    try:
        yield hops
    finally:
        ring_attention._Ring.exchange, masks.materialize = exchange, materialize


def _cp_checks(rank: int, world: int, tp: int, comms: tuple[str, ...]) -> dict[str, float]:
    ps = initialize_parallel_state(tp_size=tp, cp_size=world // tp)
    assert ps.cp_size == world // tp and ps.dp_size == 1 and ps.grad_dp_size == ps.cp_size
    assert (ps.rank, ps.tp_rank, ps.cp_rank) == (rank, rank % tp, rank // tp)  # tp-cp-dp-pp order
    out: dict[str, float] = {}
    for vname, fields in VARIANTS.items():
        for bname, batch in _batches().items():
            if vname != "plain" and bname == "documents":
                continue
            cfg = tiny_config(**fields)
            ref = _loss_grads(GLMModel(cfg, seed=3).train(), batch, ParallelState())
            assert ref["loss"] > 1.0
            for comm in comms:
                cp_cfg = dataclasses.replace(cfg, sequence_parallel=tp > 1, context_parallel_comm=comm)
                model = GLMModel(cp_cfg, ps, seed=3).train()
                with _watch(batch["input_ids"].shape[1]) as hops:  # document isolation: no [S, S] mask either
                    out[f"{comm}/{vname}/{bname}"] = _diff(_loss_grads(model, batch, ps), ref)
                assert (hops[0] > 0) == (comm == "ring"), (comm, hops)  # the ring ran (and only in ring mode)
    # Dropout: the masks of one process (hidden dropout drawn over the whole sequence, attention-probability
    # dropout over [b, h, S, S], the rows of this rank kept), so the same loss and gradients.
    if tp == 1:
        cfg = tiny_config(hidden_dropout=0.2, attention_dropout=0.1)
        for bname, batch in _batches().items():
            torch.manual_seed(9)
            ref = _loss_grads(GLMModel(cfg, seed=3).train(), batch, ParallelState())
            torch.manual_seed(9)
            with _watch(batch["input_ids"].shape[1]) as hops:
                got = _loss_grads(GLMModel(cfg, ps, seed=3).train(), batch, ps)
            assert hops[0] == 0  # attention dropout gathers (the exact masks of one process)
            out[f"dropout/{bname}"] = _diff(got, ref)
            torch.manual_seed(9)
            other = GLMModel(cfg, seed=3).train()
            torch.manual_seed(10)  # another draw moves the loss far beyond the tolerance: the test can fail
            out[f"dropout-differs/{bname}"] = -_diff(_loss_grads(other, batch, ParallelState()), ref)
        out |= _ring_kernel_checks(ContextParallel.of(ps))
    return out


def _ring_kernel_checks(cp: ContextParallel) -> dict[str, float]:
    """The ring on its own against softmax attention over the whole sequence: grouped-query heads (4 query heads,
    2 key/value groups), a mask with rows that see nothing (zeros out, zero gradients) and a key block that no
    query of rank 0 sees (skipped), the layer-scaled scores (``fp32_coeff``) in row tiles; output and every
    gradient."""
    gen = torch.Generator().manual_seed(7)
    b, h, g, seq, d = 2, 4, 2, 16, 8
    q, k, v = (torch.randn(b, n, seq, d, generator=gen) for n in (h, g, g))
    mask = torch.rand(b, 1, seq, seq, generator=gen) < 0.5
    mask[0, :, 3] = False  # a row with nothing visible
    mask[:, :, zigzag_indices(seq, 2, 0)[:, None], zigzag_indices(seq, 2, 1)] = False  # rank 0 skips a block
    grad = torch.randn(b, h, seq, d, generator=gen)
    out: dict[str, float] = {}
    tile = ring_attention.TILE_ELEMENTS
    for coeff, rows in ((None, 0), (3.0, 3)):  # the second in tiles of 3 query rows (8 = 3 + 3 + 2)
        ring_attention.TILE_ELEMENTS = rows * b * h * seq // 2 or tile
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        kr, vr = (t.repeat_interleave(h // g, dim=1) for t in full[1:])
        scores = (full[0] @ kr.transpose(-1, -2) / d**0.5).masked_fill(~mask, float("-inf"))
        ref = torch.nan_to_num(torch.softmax(scores, dim=-1)) @ vr
        ref.backward(grad)
        pos = cp.local_positions(seq // 2)
        local = [split_sequence(t, 2, cp.rank, dim=2).requires_grad_() for t in (q, k, v)]
        try:
            got = ring_attention.ring_attention(*local, masks.dense_mask_mod(mask), pos, cp, coeff)
            got.backward(split_sequence(grad, 2, cp.rank, dim=2))
        finally:
            ring_attention.TILE_ELEMENTS = tile
        pairs = [(got, ref)] + [(t.grad, f.grad) for t, f in zip(local, full)]
        out[f"ring-kernel/coeff={coeff}"] = max(
            (a - split_sequence(r, 2, cp.rank, dim=2)).abs().max().item() for a, r in pairs
        )
    if cp.rank == 0:  # position 3 (rank 0's row 3) sees nothing: zeros, no gradient
        assert torch.all(got[0, :, 3] == 0) and torch.all(local[0].grad[0, :, 3] == 0)
    return out


@pytest.mark.parametrize(
    "world,tp,comms", [(2, 1, ("ring", "gather")), (4, 2, ("ring",))], ids=["cp2-ring-gather", "tp2xcp2-ring"]
)
def test_context_parallel_matches_one_process(world: int, tp: int, comms: tuple[str, ...]) -> None:
    for rank, diffs in enumerate(run_distributed(_cp_checks, world, tp, comms)):
        assert len(diffs) >= 11 * len(comms)
        bad = {k: v for k, v in diffs.items() if not (v <= 1e-5 if "differs" not in k else v < -1e-3)}
        assert not bad, f"rank {rank}: {bad}"


def test_zigzag_split_and_mask_rows() -> None:
    assert zigzag_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([zigzag_indices(24, 3, r) for r in range(3)]).sort().values
    assert torch.equal(every, torch.arange(24))
    x = torch.arange(32).view(2, 16)
    assert split_sequence(x, 2, 1)[1].tolist() == list(range(20, 28))
    with pytest.raises(ValueError, match="not divisible by 2 x context-parallel size 4"):
        zigzag_indices(12, 4, 0)
    # The local mask: rows at this rank's query positions, columns at the gathered keys' positions.
    sep = torch.tensor([5, 9])
    full = sep_to_mask(sep, 16)
    for r in range(2):
        cp = ContextParallel(2, r, None)
        got = local_mask(sep, cp, 2, 8, torch.device("cpu")).bool_mask
        rows, cols = cp.local_positions(8), cp.gathered_positions(8)
        assert torch.equal(got, full[:, :, rows][:, :, :, cols])


def test_context_parallel_dropout_draws_the_one_process_mask() -> None:
    """Bitwise: each rank's hidden-dropout output is its rows of the full-sequence dropout (same RNG state)."""
    x = torch.randn(2, 16, 8)
    torch.manual_seed(4)
    ref = nn.Dropout(0.3).train()(x)
    for r in range(2):
        cp = ContextParallel(2, r, None)
        torch.manual_seed(4)
        got = ContextParallelDropout(0.3, cp, exact=True).train()(split_sequence(x, 2, r, dim=1))
        assert torch.equal(got, split_sequence(ref, 2, r, dim=1))
