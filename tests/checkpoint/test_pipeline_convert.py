"""Pipeline layouts are not locked in: PP2 -> PP1 -> PP2 round trips bitwise, and a run of any layout starts
from any other layout's weights (``--checkpoint.load_weights_only``) with identical losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.formats.native import NativeSource, layer_file
from megatron_glm.checkpoint.safe_load import safe_torch_load
from tests.checkpoint.test_convert_e2e import convert
from tests.training.conftest import launch, metrics, train_args

pytestmark = pytest.mark.slow


def _first_losses(save: Path) -> list[float]:
    m = metrics(save)
    return [m[s]["loss"] for s in sorted(m)]


def test_pp2_to_pp1_and_back(tiny_corpus: dict, tmp_path: Path) -> None:
    common = ["--micro-batch-size", "2", "--global-batch-size", "4"]
    pp2 = tmp_path / "pp2"
    launch(
        train_args(
            tiny_corpus, "--train-iters", "3", *common, "--pipeline-model-parallel-size", "2", "--save", str(pp2)
        ),
        nproc=2,
    )
    out = convert(
        "--input",
        str(pp2),
        "--output",
        str(tmp_path / "pp1"),
        "--target-pp",
        "1",
        "--target-dp",
        "1",
        "--verify-logits",
    )
    assert "logits max |diff| before/after: 0" in out and "optimizer state: resharded" in out, out  # Adam carried
    convert(
        "--input", str(tmp_path / "pp1"), "--output", str(tmp_path / "pp2b"), "--target-pp", "2", "--target-dp", "1"
    )
    original, back = pp2 / "global_step3", tmp_path / "pp2b" / "global_step3"
    layers = NativeSource(original).info.config.num_layers + 3
    for i in range(layers):  # the layer files carry the same tensors, bitwise
        a, b = safe_torch_load(layer_file(original, i, 0)), safe_torch_load(layer_file(back, i, 0))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
    # The same weights start a PP=1 run and a TP2 x PP2 run: identical losses.
    start = [*common, "--train-iters", "2", "--checkpoint.load_weights_only", "true"]
    launch(train_args(tiny_corpus, *start, "--load", str(tmp_path / "pp1"), "--save", str(tmp_path / "r1")), nproc=1)
    launch(
        train_args(
            tiny_corpus,
            *start,
            "--load",
            str(pp2),
            "--pipeline-model-parallel-size",
            "2",
            "--tensor-model-parallel-size",
            "2",
            "--save",
            str(tmp_path / "r4"),
        ),
        nproc=4,
    )
    r1, r4 = _first_losses(tmp_path / "r1"), _first_losses(tmp_path / "r4")
    assert len(r1) == 2 and max(abs(a - b) for a, b in zip(r1, r4)) < 1e-5, (r1, r4)
