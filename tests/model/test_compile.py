"""``torch.compile`` of the layers: no graph breaks, and the same losses/gradients as eager (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.model import GLMModel, full_state_dict
from megatron_glm.model.compile import compile_layers, graph_breaks, is_compiled
from megatron_glm.model.context import ForwardContext
from megatron_glm.model.masks import prepare_attention_mask
from megatron_glm.parallel import ParallelState
from tests.model.helpers import make_batch, tiny_config


def _loss_grads(cfg, ps: ParallelState, compiled: bool) -> dict[str, torch.Tensor]:
    model = GLMModel(cfg, ps, seed=6).train()
    if compiled:
        assert compile_layers(model) == cfg.num_layers
        assert all(is_compiled(layer) for layer in model.transformer.layers.values())
    batch = make_batch(4)
    res = model(
        batch["input_ids"], batch["position_ids"], batch["sep"], labels=batch["labels"], loss_mask=batch["loss_mask"]
    )
    res.loss.backward()
    return {"loss": res.loss.detach(), **full_state_dict(model, ps, grads=True)}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


def test_layer_has_no_graph_breaks() -> None:
    model = GLMModel(tiny_config(), seed=6).train()
    batch = make_batch(4)
    mask = prepare_attention_mask(batch["sep"], 3, 16, "cpu")
    h = torch.randn(3, 16, 64, requires_grad=True)
    assert graph_breaks(model.transformer.layers["0"], h, ForwardContext(mask, model.rng_tracker)) == []


@pytest.mark.parametrize("fields", [{}, {"checkpoint_activations": True}], ids=["plain", "full"])
def test_compiled_equals_eager(fields: dict) -> None:
    cfg = tiny_config(**fields)
    eager, compiled = _loss_grads(cfg, ParallelState(), False), _loss_grads(cfg, ParallelState(), True)
    assert eager["loss"] > 1.0
    assert _max_diff(compiled, eager) <= 1e-5
