"""A tiny GLM-4.5-shaped MoE model trains through pretrain_glm.py with EP=2 (2 ranks): it takes the steps of
EP=1 (fp32, 1e-5), the loss falls, a run stopped at step 4 and resumed reproduces it bitwise (each expert rank's
experts restored), and the converter reshards its experts EP 2 -> 1 -> 4 keeping every tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint
from megatron_glm.checkpoint.formats.registry import open_source
from tests.training.conftest import launch, metrics, train_args
from tests.training.test_moe_e2e import GLM45_TINY

pytestmark = pytest.mark.slow

EXPERTS = "transformer.layers.2.mlp.experts.dense_h_to_4h.weight"


def _losses(save: Path) -> list[float]:
    m = metrics(save)
    return [m[s]["loss"] for s in sorted(m)]


def _run(corpus: dict, save: Path, *extra: str):
    return launch(train_args(corpus, *GLM45_TINY, "--train-iters", "8", "--save", str(save), *extra), nproc=2)


def test_tiny_glm45_at_ep2_trains_resumes_and_reshards(tiny_corpus: dict, tmp_path: Path) -> None:
    one, two, stopped = tmp_path / "ep1", tmp_path / "ep2", tmp_path / "stopped"
    _run(tiny_corpus, one)
    _run(tiny_corpus, two, "--expert-parallel-size", "2")
    losses = _losses(two)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.15, losses
    assert max(abs(a - b) for a, b in zip(_losses(one), losses, strict=True)) < 1e-5
    first = _run(tiny_corpus, stopped, "--expert-parallel-size", "2", "--exit-interval", "4")
    assert "saving and stopping at step 4" in first.stdout
    _run(tiny_corpus, stopped, "--expert-parallel-size", "2", "--load", str(stopped))
    assert _losses(stopped) == losses  # bitwise
    step = two / "global_step8"
    assert sorted(p.name for p in (step / "experts").iterdir()) == ["pp00_tp00_ep00.pt", "pp00_tp00_ep01.pt"]
    a, b = open_source(step), open_source(stopped / "global_step8")
    assert a.names() == b.names() and EXPERTS in a.names() and a.tensor(EXPERTS).shape[0] == 4
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.names())
    # EP 2 -> 1 -> 4: every full tensor kept; each EP=4 rank file holds one expert
    convert_checkpoint(step, tmp_path / "to1", ConvertOptions(target_ep=1), log=lambda _m: None)
    convert_checkpoint(
        tmp_path / "to1", tmp_path / "to4", ConvertOptions(target_ep=4, target_dp=4), log=lambda _m: None
    )
    four = open_source(tmp_path / "to4")
    assert four.info.meta["layout"]["ep"] == 4 and four.names() == a.names()
    assert all(torch.equal(four.tensor(n).float(), a.tensor(n).float()) for n in a.names())
    shard = torch.load(tmp_path / "to4" / "global_step8" / "experts" / "pp00_tp00_ep03.pt", weights_only=True)
    assert torch.equal(shard[EXPERTS], a.tensor(EXPERTS)[3:4])
