"""GLM-4's options through the training command line: with --sandwich-norm and --qk-norm (GQA, SwiGLU, RMSNorm,
half-split rotary on half the head), TP=2, PP=2 and TP=2 x PP=2 on DeepSpeed's engines give PP=1's losses (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.conftest import launch, metrics, train_args

GLM4_FLAGS = [
    "--sandwich-norm",
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
]


@pytest.mark.slow
def test_glm4_options_tp2_pp2_tp2xpp2_match_tp1(tiny_corpus: dict, tmp_path: Path) -> None:
    common = [*GLM4_FLAGS, "--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size", "4"]
    runs = {
        "tp1": ([], 1),
        "tp2": (["--tensor-model-parallel-size", "2"], 2),
        "pp2": (["--pipeline-model-parallel-size", "2"], 2),
        "tp2pp2": (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"], 4),
    }
    losses = {}
    for name, (extra, nproc) in runs.items():
        launch(train_args(tiny_corpus, *common, *extra, "--save", str(tmp_path / name)), nproc=nproc)
        m = metrics(tmp_path / name)
        losses[name] = [m[s]["loss"] for s in sorted(m)]
    ref = losses["tp1"]
    assert len(ref) == 4 and ref[-1] < ref[0]
    for name in ("tp2", "pp2", "tp2pp2"):
        assert max(abs(a - b) for a, b in zip(ref, losses[name], strict=True)) < 1e-5, (name, ref, losses[name])
