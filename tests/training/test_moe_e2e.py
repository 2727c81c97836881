"""A tiny GLM-4.5-shaped MoE model trains through pretrain_glm.py (EP = 1): the loss falls, the per-expert load is
logged, the correction bias moves, and a run stopped at step 4 and resumed gives the straight run's losses and
final weights bitwise (the bias included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.convert import open_source
from tests.training.conftest import launch, metrics, train_args

GLM45_TINY = [
    "--num-layers",
    "3",
    "--qk-norm",
    "--position-embedding-type",
    "rope",
    "--rotary-percent",
    "0.5",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--num-query-groups",
    "2",
    "--disable-bias-linear",
    "--add-qkv-bias",
    "--untie-embeddings-and-output-weights",
    "--num-experts",
    "4",
    "--moe-top-k",
    "2",
    "--moe-intermediate-size",
    "32",
    "--num-shared-experts",
    "1",
    "--first-k-dense-replace",
    "1",
    "--moe-routed-scaling-factor",
    "2.5",
    "--moe-bias-update-rate",
    "0.01",
    "--moe-aux-loss-coeff",
    "0.001",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
]
BIAS = "transformer.layers.2.mlp.router.expert_bias"


@pytest.mark.slow
def test_tiny_glm45_trains_and_resumes_bitwise(tiny_corpus: dict, tmp_path: Path) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    launch(train_args(tiny_corpus, *GLM45_TINY, "--train-iters", "8", "--save", str(straight)))
    m = metrics(straight)
    losses = [m[s]["loss"] for s in sorted(m)]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.15, losses
    assert all(m[s]["moe_load_max"] >= 1.0 >= m[s]["moe_load_min"] for s in m)
    # the loss's parts logged apart (no MTP layer: no mtp_loss): loss = lm_loss + moe_aux_loss
    assert all(abs(m[s]["lm_loss"] + m[s]["moe_aux_loss"] - m[s]["loss"]) < 1e-5 for s in m) and "mtp_loss" not in m[1]
    assert all(0 < m[s]["moe_aux_loss"] < 0.01 for s in m), m
    common = [*GLM45_TINY, "--train-iters", "8", "--save", str(stopped)]
    launch(train_args(tiny_corpus, *common, "--exit-interval", "4"))
    assert sorted(metrics(stopped)) == [1, 2, 3, 4]
    launch(train_args(tiny_corpus, *common, "--load", str(stopped)))
    resumed = metrics(stopped)
    assert [resumed[s]["loss"] for s in sorted(resumed)] == losses
    a, b = open_source(straight), open_source(stopped)
    assert a.names() == b.names() and BIAS in a.names()
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.names())
    bias = a.tensor(BIAS)
    assert bias.dtype == torch.float32 and bias.abs().max() > 0  # moved by the balancing, never by a gradient
