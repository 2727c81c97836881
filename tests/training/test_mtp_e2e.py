"""GLM-4.5's MTP layer through the training command line and the converter: with --num-nextn-predict-layers 1 on a
GLM-4.5-shaped toy (fp32, MoE), PP=2 x EP=2 on DeepSpeed's pipeline engine gives PP=1's losses; the checkpoint
converts PP2 x EP2 -> TP2 x PP1 -> PP2 x EP2 bitwise, the MTP tensors kept, and a run resumed from a converted one
continues it. (MTP = fp64 reference, TP and pipeline parts: test_mtp.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint
from megatron_glm.checkpoint.formats.native import NativeSource, layer_file
from megatron_glm.checkpoint.safe_load import safe_torch_load
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


def _stage_files(step: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A pipeline checkpoint with experts: each stage's model-states ``module`` and each expert shard."""
    files = {f.name: safe_torch_load(f)["module"] for f in sorted(step.glob("mp_rank_*_model_states.pt"))}
    return {**files, **{f"experts/{f.name}": safe_torch_load(f) for f in sorted((step / "experts").glob("*.pt"))}}


def test_mtp_on_moe_pp2_ep2_matches_pp1_converts_and_resumes(tiny_corpus: dict, tmp_path: Path) -> None:
    """GLM-4.5's shape: MoE layers after a dense one, the MTP layer an MoE layer, the balance loss on; PP=2 x EP=2
    (4 processes) logs PP=1's losses and its per-expert loads of every MoE layer (both stages'). Its checkpoint (a
    model file and expert shards per stage) converts PP2 x EP2 -> TP2 x PP1 x EP1 (optimizer included) -> PP2 x EP2
    back bitwise, and to PP2 x EP1 (the MTP tensors in the final norm's layer file); PP=1 resumed from its step 2
    converted to PP1 x EP1 takes its step 3 (1e-5)."""
    common = [*MTP_FLAGS, *MOE_FLAGS, "--num-layers", "4", "--train-iters", "3", "--micro-batch-size", "2"]
    common += ["--global-batch-size", "4"]
    launch(train_args(tiny_corpus, *common, "--save", str(tmp_path / "pp1")), nproc=1)
    pp2, par = tmp_path / "pp2", ["--pipeline-model-parallel-size", "2", "--expert-parallel-size", "2"]
    launch(train_args(tiny_corpus, *common, *par, "--save-interval", "2", "--save", str(pp2)), nproc=4)
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
    # Layers 1-3 and the MTP layer route (MoE layers 0-3, split over the two stages): every one logged under PP=2
    # (rank 0 holds only stage 0's routers) as under PP=1, the same token counts exactly.
    loads = {f"moe_load_max_{j}" for j in range(4)} | {"moe_load_max", "moe_load_min"}
    for s in one:
        assert {k for k in two[s] if k.startswith("moe_load")} == loads, two[s]
        assert all(one[s][k] == two[s][k] for k in loads), (one[s], two[s])

    original, quiet = pp2 / "global_step3", lambda _m: None
    files = _stage_files(original)
    assert sorted(files) == [
        *[f"experts/pp{s:02d}_tp00_ep{e:02d}.pt" for s in range(2) for e in range(2)],
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
    ]
    mtp_experts = [k for k in files["experts/pp01_tp00_ep01.pt"] if ".mtp.0.layer.mlp.experts." in k]
    assert len(mtp_experts) == 2, sorted(files["experts/pp01_tp00_ep01.pt"])
    tp2, back = tmp_path / "tp2", tmp_path / "back"
    out = convert_checkpoint(original, tp2, ConvertOptions(target_tp=2, target_ep=1, target_dp=1), log=quiet)
    assert out.optimizer.startswith("resharded"), out.optimizer
    convert_checkpoint(tp2, back, ConvertOptions(target_pp=2, target_ep=2, target_dp=2), log=quiet)
    again = _stage_files(back / "global_step3")
    assert all(list(again[f]) == list(v) and all(torch.equal(again[f][k], v[k]) for k in v) for f, v in files.items())
    convert_checkpoint(tp2, tmp_path / "ep1", ConvertOptions(target_pp=2, target_ep=1), log=quiet)
    source, cfg = NativeSource(original), NativeSource(tp2).info.config
    final = cfg.num_layers + 2  # the final norm's pipe layer holds the MTP layer
    layer = safe_torch_load(layer_file(tmp_path / "ep1" / "global_step3", final, 0))
    assert any(k.startswith("transformer.mtp.0.layer.mlp.experts.") for k in layer), sorted(layer)
    assert all(torch.equal(source.module_tensor(k), v) for k, v in layer.items())
    # TP=2 halves the MTP decoder layer's split tensors and keeps the replicated ones whole.
    tp2_source = NativeSource(tp2)
    qkv = "transformer.mtp.0.layer.attention.query_key_value.weight"
    assert torch.equal(tp2_source.tensor(qkv), layer[qkv])
    assert torch.equal(tp2_source.tensor("transformer.mtp.0.eh_proj.weight"), layer["transformer.mtp.0.eh_proj.weight"])

    resumed = tmp_path / "one"  # step 2 on one process, optimizer state carried: step 3 is PP2 x EP2's
    convert_checkpoint(pp2 / "global_step2", resumed, ConvertOptions(target_pp=1, target_ep=1, target_dp=1), log=quiet)
    launch(train_args(tiny_corpus, *common, "--save", str(resumed), "--load", str(resumed)), nproc=1)
    assert sorted(metrics(resumed)) == [3] and abs(metrics(resumed)[3]["loss"] - got[2]) < 1e-5, (metrics(resumed), got)
