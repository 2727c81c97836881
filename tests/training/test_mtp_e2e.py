"""GLM-4.5's MTP layer through the training command line and the converter: with --num-nextn-predict-layers 1 on a
GLM-4.5-shaped toy (fp32, MoE), PP=2 on DeepSpeed's pipeline engine gives PP=1's losses; the checkpoint converts
PP2 -> TP2 x PP1 -> PP2 with the MTP tensors kept bitwise. (MTP = fp64 reference, TP and pipeline parts: test_mtp.)"""

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


MOE_FLAGS = [
    *["--num-experts", "4", "--moe-top-k", "2", "--moe-intermediate-size", "32", "--num-shared-experts", "1"],
    *["--first-k-dense-replace", "1", "--moe-aux-loss-coeff", "0.01"],
]


def test_mtp_on_moe_pp2_matches_pp1_and_converts(tiny_corpus: dict, tmp_path: Path) -> None:
    """GLM-4.5's shape: MoE layers after a dense one, the MTP layer an MoE layer, the balance loss on; PP=2 logs
    PP=1's losses, and the checkpoint converts PP2 -> TP2 x PP1 -> PP2 with the MTP tensors kept bitwise."""
    common = [*MTP_FLAGS, *MOE_FLAGS, "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "4"]
    launch(train_args(tiny_corpus, *common, "--save", str(tmp_path / "pp1")), nproc=1)
    pp2 = tmp_path / "pp2"
    launch(train_args(tiny_corpus, *common, "--pipeline-model-parallel-size", "2", "--save", str(pp2)), nproc=2)
    ref, got = _losses(tmp_path / "pp1"), _losses(pp2)
    assert len(ref) == 3 and max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 1e-5, (ref, got)
    step1 = metrics(tmp_path / "pp1")[1]  # the logged total carries the MTP term, the objective's loss does not
    assert step1["loss"] - step1["loss_token"] > 0.1, step1
    # The parts are logged apart on every step, PP=2 (the last stage's, averaged as the loss) as PP=1:
    # loss = lm_loss + 0.3 x mtp_loss + moe_aux_loss.
    one, two = metrics(tmp_path / "pp1"), metrics(pp2)
    for run in (one, two):
        for m in run.values():
            assert abs(m["lm_loss"] + 0.3 * m["mtp_loss"] + m["moe_aux_loss"] - m["loss"]) < 1e-5, m
            assert m["mtp_loss"] > 1.0 and 0 < m["moe_aux_loss"] < 0.1 and m["lm_loss"] > 1.0, m
    parts = ("lm_loss", "mtp_loss", "moe_aux_loss")
    assert max(abs(one[s][k] - two[s][k]) for s in one for k in parts) < 1e-5, (one, two)

    tp2 = tmp_path / "tp2"
    out = convert("--input", str(pp2), "--output", str(tp2), "--target-pp", "1", "--target-tp", "2", "--target-dp", "1")
    convert("--input", str(tp2), "--output", str(tmp_path / "back"), "--target-pp", "2", "--target-tp", "1")
    original, back = pp2 / "global_step3", tmp_path / "back" / "global_step3"
    cfg = NativeSource(original).info.config
    final = cfg.num_layers + 2  # the final norm's pipe layer holds the MTP layer
    a, b = safe_torch_load(layer_file(original, final, 0)), safe_torch_load(layer_file(back, final, 0))
    assert any(k.startswith("transformer.mtp.0.layer.mlp.experts.") for k in a), sorted(a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), out
    # TP=2 halves the MTP decoder layer's split tensors and keeps the replicated ones whole.
    source = NativeSource(tp2)
    qkv = source.tensor("transformer.mtp.0.layer.attention.query_key_value.weight")
    assert torch.equal(qkv, a["transformer.mtp.0.layer.attention.query_key_value.weight"])
    assert torch.equal(source.tensor("transformer.mtp.0.eh_proj.weight"), a["transformer.mtp.0.eh_proj.weight"])
