"""The converter reshards the ZeRO-1/2 optimizer state of an expert-parallel run (issue 25, with issue 12's
rules): EP 2 -> 1 -> 2 writes DeepSpeed's own expert-group partitions back bitwise, and a run resumed from
the converted checkpoint at EP=1 (and back at EP=2) takes the straight EP=2 run's next steps (1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint
from megatron_glm.checkpoint.formats.registry import open_source
from megatron_glm.checkpoint.safe_load import safe_torch_load
from tests.training.conftest import launch, metrics, train_args
from tests.training.test_moe_e2e import GLM45_TINY

pytestmark = pytest.mark.slow

EXPERTS = "transformer.layers.2.mlp.experts.dense_h_to_4h.weight"


def _run(corpus: dict, save: Path, ep: int, *extra: str) -> dict[int, float]:
    args = [*GLM45_TINY, "--train-iters", "8", "--save", str(save), "--expert-parallel-size", str(ep), *extra]
    launch(train_args(corpus, *args), nproc=2)
    return {s: row["loss"] for s, row in metrics(save).items()}


def _zero(step: Path, d: int) -> dict:
    return safe_torch_load(step / f"zero_pp_rank_{d}_mp_rank_00_optim_states.pt", mmap=True)["optimizer_state_dict"]


def test_ep_optimizer_state_reshards_and_resumes(tiny_corpus: dict, tmp_path: Path) -> None:
    straight = _run(tiny_corpus, tmp_path / "straight", 2)
    _run(tiny_corpus, tmp_path / "ep2", 2, "--exit-interval", "4")
    step4 = tmp_path / "ep2" / "global_step4"
    quiet = lambda _m: None
    one = convert_checkpoint(step4, tmp_path / "ep1", ConvertOptions(target_ep=1, target_dp=2), log=quiet)
    assert one.optimizer.startswith("resharded") and one.verified, one
    src, dst = open_source(step4), open_source(tmp_path / "ep1")
    assert src.optimizer_state(EXPERTS)["exp_avg"].shape[0] == 4  # every expert rank's experts consolidated
    assert src.optimizer_state(EXPERTS)["exp_avg"].abs().max() > 0
    for n in src.names():  # the same full fp32 weights and moments, now in the dense groups
        a, b = src.optimizer_state(n), dst.optimizer_state(n)
        assert (a is None) == (b is None) and (a is None or all(torch.equal(a[k], b[k]) for k in a)), n
    assert [len(g) for g in _zero(step4, 0)["single_partition_of_fp32_groups"]] != [] and len(
        _zero(tmp_path / "ep1" / "global_step4", 0)["partition_count"]
    ) == 2  # EP=2 has an expert group (partitioned over 1 expert-data-parallel rank), EP=1 none
    assert _zero(step4, 0)["partition_count"] == [2, 2, 1]
    two = convert_checkpoint(tmp_path / "ep1", tmp_path / "ep2b", ConvertOptions(target_ep=2, target_dp=2), log=quiet)
    assert two.optimizer.startswith("resharded"), two
    for d in range(2):  # back at EP=2: DeepSpeed's own files, bitwise
        a, b = _zero(step4, d), _zero(tmp_path / "ep2b" / "global_step4", d)
        assert a["partition_count"] == b["partition_count"] and a["param_slice_mappings"] == b["param_slice_mappings"]
        assert a["base_optimizer_state"]["param_groups"] == b["base_optimizer_state"]["param_groups"]
        for g, part in enumerate(a["single_partition_of_fp32_groups"]):
            assert torch.equal(part, b["single_partition_of_fp32_groups"][g])
            sa, sb = a["base_optimizer_state"]["state"][g], b["base_optimizer_state"]["state"][g]
            assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    # resumed at EP=1 from the converted checkpoint: the straight EP=2 run's steps 5-8
    for folder, ep in (("ep1", 1), ("ep2b", 2)):
        resumed = _run(tiny_corpus, tmp_path / folder, ep, "--load", str(tmp_path / folder))
        assert sorted(resumed) == [5, 6, 7, 8]
        assert max(abs(straight[s] - resumed[s]) for s in resumed) < 1e-5, (folder, straight, resumed)
