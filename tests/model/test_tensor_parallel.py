"""Tensor parallelism: logits and every parameter gradient at TP = 2 and 4 equal TP = 1.

One spawn per TP size runs all checks; each rank builds the TP = 1 model locally as the reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_glm.model import GLMModel, full_state_dict, glm_loss, load_full_state_dict
from megatron_glm.parallel import ParallelState, gather_from_tensor_parallel_region, initialize_parallel_state
from megatron_glm.testing import run_distributed
from tests.model.helpers import make_batch, pipe_parts, random_full_state_dict, run_parts, tiny_config

ATOL = 1e-5


def _step(model: GLMModel, batch: dict, ps: ParallelState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full logits and full gradients after one forward/backward of the masked loss."""
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
    glm_loss(logits, batch["labels"], batch["loss_mask"], ps).loss.backward()
    full_logits = gather_from_tensor_parallel_region(logits.detach(), ps.tp_group)
    return full_logits, full_state_dict(model, ps, grads=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _tp_checks(rank: int, world: int) -> dict[str, float]:
    ps = initialize_parallel_state(tp_size=world)
    batch = make_batch(20)
    out: dict[str, float] = {}
    for impl in ("sdpa", "eager"):
        cfg = tiny_config(attention_impl=impl)
        ref, par = GLMModel(cfg, seed=5), GLMModel(cfg, ps, seed=5)
        # Same seed: identical full weights, then identical logits and gradients.
        weights = full_state_dict(par, ps)
        assert all(torch.equal(weights[k], v) for k, v in ref.state_dict().items())
        for tag in ("seed", "loaded"):
            if tag == "loaded":
                sd = random_full_state_dict(ref, seed=21)
                load_full_state_dict(ref, sd)
                load_full_state_dict(par, sd, ps)
                assert _max_diff(full_state_dict(par, ps), sd) == 0.0
            (rl, rg), (pl, pg) = _step(ref, batch, ParallelState()), _step(par, batch, ps)
            out[f"{impl}/{tag}/logits"] = (rl - pl).abs().max().item()
            out[f"{impl}/{tag}/grads"] = _max_diff(rg, pg)
            scale = max(g.abs().max().item() for g in rg.values())
            assert scale > 1e-3, f"gradients too small to compare ({scale})"
    # The pipeline's parts under TP, chained, equal the TP = 1 whole model (tied embedding gradients summed).
    cfg = tiny_config()
    whole = GLMModel(cfg, seed=5)
    parts = pipe_parts(cfg, ps, seed=5)
    rl, rg = _step(whole, batch, ParallelState())
    logits = run_parts(parts, batch)
    glm_loss(logits, batch["labels"], batch["loss_mask"], ps).loss.backward()
    grads = {k: v for p in parts[1:-1] for k, v in full_state_dict(p, ps, grads=True).items()}
    grads["word_embeddings.weight"] = (
        full_state_dict(parts[0], ps, grads=True)["word_embeddings.weight"]
        + full_state_dict(parts[-1], ps, grads=True)["word_embeddings.weight"]
    )
    out["pipeline/logits"] = (gather_from_tensor_parallel_region(logits.detach(), ps.tp_group) - rl).abs().max().item()
    out["pipeline/grads"] = _max_diff({k: grads[k] for k in rg}, rg)
    # Activation checkpointing with dropout under TP reproduces the per-rank attention-dropout stream.
    cfg = dataclasses.replace(tiny_config(), hidden_dropout=0.1, attention_dropout=0.2, num_layers=2)
    model = GLMModel(cfg, ps, seed=5).train()
    states = model.rng_tracker.get_states()
    runs = []
    for ckpt in (False, True):
        model.transformer.checkpoint_activations = ckpt
        model.rng_tracker.set_states(states)
        torch.manual_seed(3)
        runs.append(_step(model, batch, ps))
    out["checkpoint/logits"] = (runs[0][0] - runs[1][0]).abs().max().item()
    out["checkpoint/grads"] = _max_diff(runs[0][1], runs[1][1])
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_single_process(tp: int) -> None:
    results = run_distributed(_tp_checks, tp)
    for rank, diffs in enumerate(results):
        bad = {k: v for k, v in diffs.items() if not v <= ATOL}
        assert not bad, f"rank {rank}: {bad}"
    print(results[0])
