"""GLM-4.5's MTP layer through the training command line and the converter: with --num-nextn-predict-layers 1 on a
GLM-4-shaped toy (fp32), PP=2 on DeepSpeed's pipeline engine gives PP=1's losses; the checkpoint converts PP2 ->
TP2 x PP1 -> PP2 with the MTP tensors kept bitwise, and the converted weights start a PP=1 run with the same loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.formats.native import NativeSource, layer_file
from megatron_glm.checkpoint.safe_load import safe_torch_load
from tests.checkpoint.test_convert_e2e import convert
from tests.training.conftest import launch, metrics, train_args
from tests.training.test_glm4_options_e2e import GLM4_FLAGS

pytestmark = pytest.mark.slow

MTP_FLAGS = [*GLM4_FLAGS, "--num-nextn-predict-layers", "1", "--mtp-loss-weight", "0.3"]


def _losses(save: Path) -> list[float]:
    m = metrics(save)
    return [m[s]["loss"] for s in sorted(m)]


def test_mtp_pp2_matches_pp1_and_converts(tiny_corpus: dict, tmp_path: Path) -> None:
    common = [*MTP_FLAGS, "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "4"]
    launch(train_args(tiny_corpus, *common, "--save", str(tmp_path / "pp1")), nproc=1)
    pp2 = tmp_path / "pp2"
    launch(train_args(tiny_corpus, *common, "--pipeline-model-parallel-size", "2", "--save", str(pp2)), nproc=2)
    ref, got = _losses(tmp_path / "pp1"), _losses(pp2)
    assert len(ref) == 3 and max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 1e-5, (ref, got)
    # The same run without MTP: the logged total lacks the MTP term, the language-model loss is the same at step 1.
    launch(train_args(tiny_corpus, *GLM4_FLAGS, *common[len(MTP_FLAGS) :], "--save", str(tmp_path / "off")), nproc=1)
    off, with_mtp = metrics(tmp_path / "off")[1], metrics(tmp_path / "pp1")[1]
    assert with_mtp["loss"] - off["loss"] > 0.1, (with_mtp, off)
    assert abs(with_mtp["loss_token"] - off["loss_token"]) < 1e-5, (with_mtp, off)

    tp2 = tmp_path / "tp2"
    out = convert("--input", str(pp2), "--output", str(tp2), "--target-pp", "1", "--target-tp", "2", "--target-dp", "1")
    convert("--input", str(tp2), "--output", str(tmp_path / "back"), "--target-pp", "2", "--target-tp", "1")
    original, back = pp2 / "global_step3", tmp_path / "back" / "global_step3"
    cfg = NativeSource(original).info.config
    final = cfg.num_layers + 2  # the final norm's pipe layer holds the MTP layer
    a, b = safe_torch_load(layer_file(original, final, 0)), safe_torch_load(layer_file(back, final, 0))
    assert any(k.startswith("transformer.mtp.0.layer.") for k in a), sorted(a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), out
    # TP=2 halves the MTP decoder layer's split tensors and keeps the replicated ones whole.
    source = NativeSource(tp2)
    qkv = source.tensor("transformer.mtp.0.layer.attention.query_key_value.weight")
    assert torch.equal(qkv, a["transformer.mtp.0.layer.attention.query_key_value.weight"])
    assert torch.equal(source.tensor("transformer.mtp.0.eh_proj.weight"), a["transformer.mtp.0.eh_proj.weight"])
    # The converted weights start a PP=1 run: its first loss is the PP=2 run's loss on its weights.
    start = [*common, "--train-iters", "1", "--checkpoint.load_weights_only", "true"]
    launch(train_args(tiny_corpus, *start, "--load", str(tp2), "--save", str(tmp_path / "r1")), nproc=1)
    launch(
        train_args(
            tiny_corpus,
            *start,
            "--load",
            str(pp2),
            "--pipeline-model-parallel-size",
            "2",
            "--save",
            str(tmp_path / "r2"),
        ),
        nproc=2,
    )
    assert abs(_losses(tmp_path / "r1")[0] - _losses(tmp_path / "r2")[0]) < 1e-5


MOE_FLAGS = [
    *["--num-experts", "4", "--moe-top-k", "2", "--moe-intermediate-size", "32", "--num-shared-experts", "1"],
    *["--first-k-dense-replace", "1", "--moe-aux-loss-coeff", "0.01"],
]


def test_mtp_on_moe_pp2_matches_pp1(tiny_corpus: dict, tmp_path: Path) -> None:
    """GLM-4.5's shape: MoE layers after a dense one, the MTP layer an MoE layer, the balance loss on."""
    common = [*MTP_FLAGS, *MOE_FLAGS, "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "4"]
    launch(train_args(tiny_corpus, *common, "--save", str(tmp_path / "pp1")), nproc=1)
    launch(
        train_args(tiny_corpus, *common, "--pipeline-model-parallel-size", "2", "--save", str(tmp_path / "pp2")),
        nproc=2,
    )
    ref, got = _losses(tmp_path / "pp1"), _losses(tmp_path / "pp2")
    assert len(ref) == 3 and max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 1e-5, (ref, got)
