"""The head on loss positions only (``logit_positions`` + ``glm_loss_at``) equals the full-sequence loss."""

from __future__ import annotations

import torch

from megatron_glm.config import build_config
from megatron_glm.model import GLMModel, glm_loss, glm_loss_at, loss_positions
from megatron_glm.parallel import initialize_parallel_state
from megatron_glm.testing import run_distributed


def _loss_and_grads(tp: int, rank: int = 0) -> dict:
    ps = initialize_parallel_state(tp_size=tp)
    cfg = build_config(
        {"model.size": "glm-tiny", "model.vocab_size": 256, "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}
    ).model
    g = torch.Generator().manual_seed(0)
    b, s = 3, 24
    ids = torch.randint(0, 256, (b, s), generator=g)
    labels = torch.randint(0, 256, (b, s), generator=g)
    sep = torch.tensor([5, 11, 24])  # the last sample has no Part B: no loss positions at all
    pos = torch.arange(s).expand(b, 2, s).clone()
    loss_mask = (torch.arange(s)[None] >= sep[:, None]).float()
    out = {}
    for name in ("full", "positions"):
        model = GLMModel(cfg, ps, seed=1)
        if name == "full":
            res = glm_loss(model(ids, pos, sep), labels, loss_mask, ps)
        else:
            at = loss_positions(loss_mask)
            res = glm_loss_at(model(ids, pos, sep, logit_positions=at), at, labels, loss_mask, ps)
        res.loss.backward()
        out[name] = {
            "loss": res.loss.detach(),
            "per_token": res.per_token,
            "sample_sum": res.sample_sum,
            **{k: p.grad for k, p in model.named_parameters()},
        }
    return out


def _check(rank: int, world: int) -> dict:
    out = _loss_and_grads(world, rank)
    for k, ref in out["full"].items():
        torch.testing.assert_close(out["positions"][k], ref, rtol=0, atol=1e-6, msg=k)
    return {}


def test_head_on_loss_positions_matches_full_loss() -> None:
    out = _loss_and_grads(1)
    assert out["full"]["loss"] > 0 and out["full"]["sample_sum"][2] == 0
    for k, ref in out["full"].items():
        torch.testing.assert_close(out["positions"][k], ref, rtol=0, atol=1e-6, msg=k)


def test_head_on_loss_positions_matches_full_loss_tp2() -> None:
    run_distributed(_check, 2)
