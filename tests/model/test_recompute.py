"""Selective (attention core) and full recomputation give the same losses and gradients as none, with dropout."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.config import load_config, problems
from megatron_glm.model import GLMModel, glm_loss
from tests.model.helpers import make_batch, tiny_config


def _run(granularity: str, impl: str) -> tuple[dict[str, torch.Tensor], int]:
    cfg = tiny_config(hidden_dropout=0.1, attention_dropout=0.2, attention_impl=impl, recompute_granularity=granularity)
    model = GLMModel(cfg, seed=4).train()
    batch = make_batch(1, seq=32)
    torch.manual_seed(7)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
        loss = glm_loss(logits, batch["labels"], batch["loss_mask"]).loss
    loss.backward()
    grads = {"loss": loss.detach(), **{k: p.grad for k, p in model.named_parameters()}}
    return grads, saved


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_recompute_matches_no_recompute(impl: str) -> None:
    ref, ref_saved = _run("", impl)
    for granularity in ("selective", "full"):
        out, saved = _run(granularity, impl)
        for k, v in ref.items():
            torch.testing.assert_close(out[k], v, rtol=0, atol=1e-6, msg=f"{granularity} {k}")
        assert saved < ref_saved, (granularity, saved, ref_saved)
    if impl == "eager":  # the [b, h, s, s] scores/probabilities are no longer kept
        _, selective = _run("selective", impl)
        b, heads, s = 3, 4, 32
        assert ref_saved - selective >= 2 * b * heads * s * s * 4 * 2  # >= probs + mask-sized blocks per layer


def test_selective_conflicts_with_checkpoint_activations() -> None:
    assert problems(load_config(["--checkpoint-activations", "--recompute-granularity", "selective"])) == [
        "model.checkpoint_activations (full recomputation) conflicts with model.recompute_granularity "
        "'selective'; set one of them"
    ]
    assert problems(load_config(["--recompute-granularity", "selective"])) == []
