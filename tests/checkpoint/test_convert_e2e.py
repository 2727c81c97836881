"""Conversion of real checkpoints written by pretrain_glm.py: TP reshard with the optimizer, continued training,
ZeRO-3 consolidation and a weights-only start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.formats.native import NativeSource
from megatron_glm.checkpoint.safe_load import safe_torch_load
from tests.training.conftest import ROOT, launch, metrics, train_args

pytestmark = pytest.mark.slow


def convert(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_tp2_reshard_round_trip_and_continued_training(tiny_corpus: dict, tmp_path: Path) -> None:
    common = ["--train-iters", "8", "--micro-batch-size", "2", "--global-batch-size", "4"]
    run = tmp_path / "tp2"
    launch(
        train_args(
            tiny_corpus, *common, "--tensor-model-parallel-size", "2", "--save", str(run), "--save-interval", "4"
        ),
        nproc=2,
    )
    step4 = run / "global_step4"
    out = convert(
        "--input",
        str(step4),
        "--output",
        str(tmp_path / "tp1"),
        "--target-tp",
        "1",
        "--target-dp",
        "1",
        "--verify-logits",
    )
    assert "optimizer state: resharded" in out and "logits max |diff| before/after: 0" in out, out
    convert("--input", str(tmp_path / "tp1"), "--output", str(tmp_path / "tp4"), "--target-tp", "4", "--target-dp", "1")
    convert(
        "--input", str(tmp_path / "tp4"), "--output", str(tmp_path / "tp2b"), "--target-tp", "2", "--target-dp", "1"
    )
    back = tmp_path / "tp2b" / "global_step4"
    for t in range(2):  # bitwise: model shards and DeepSpeed's own ZeRO partitions
        a = safe_torch_load(step4 / f"mp_rank_{t:02d}_model_states.pt")["module"]
        b = safe_torch_load(back / f"mp_rank_{t:02d}_model_states.pt")["module"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        oa = safe_torch_load(step4 / f"zero_pp_rank_0_mp_rank_{t:02d}_optim_states.pt")["optimizer_state_dict"]
        ob = safe_torch_load(back / f"zero_pp_rank_0_mp_rank_{t:02d}_optim_states.pt")["optimizer_state_dict"]
        for g in range(2):
            assert torch.equal(oa["single_partition_of_fp32_groups"][g], ob["single_partition_of_fp32_groups"][g])
            for key in ("exp_avg", "exp_avg_sq", "step"):
                sa, sb = oa["base_optimizer_state"]["state"][g], ob["base_optimizer_state"]["state"][g]
                assert torch.equal(sa[key], sb[key]), key
    # continue from the TP1 checkpoint: the losses of steps 5-8 are those of the uninterrupted TP2 run
    launch(train_args(tiny_corpus, *common, "--load", str(tmp_path / "tp1"), "--save", str(tmp_path / "tp1")), nproc=1)
    original, resumed = metrics(run), metrics(tmp_path / "tp1")
    assert sorted(resumed) == [5, 6, 7, 8]
    diffs = [abs(original[s]["loss"] - resumed[s]["loss"]) for s in resumed]
    assert max(diffs) < 1e-5, (original, resumed)


def test_zero3_consolidation_and_weights_only_start(tiny_corpus: dict, tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = tmp_path / "z3"
    common = ["--micro-batch-size", "2", "--global-batch-size", "4"]
    launch(
        train_args(
            tiny_corpus,
            "--train-iters",
            "6",
            *common,
            "--deepspeed_config",
            str(ROOT / "ds_configs" / "zero3.json"),
            "--save",
            str(run),
        ),
        nproc=2,
    )
    out = convert(
        "--input",
        str(run),
        "--output",
        str(tmp_path / "full"),
        "--target-tp",
        "2",
        "--target-dp",
        "1",
        "--verify-logits",
    )
    assert "NOT carried: ZeRO-3" in out and "logits max |diff| before/after: 0" in out, out
    reference = get_fp32_state_dict_from_zero_checkpoint(str(run))
    src = NativeSource(tmp_path / "full")
    assert all(torch.equal(src.tensor(n), reference[n]) for n in src.names())
    proc = launch(
        train_args(tiny_corpus, "--train-iters", "6", *common, "--load", str(tmp_path / "full")), nproc=2, check=False
    )
    assert proc.returncode != 0 and "load_weights_only" in proc.stdout + proc.stderr
    launch(
        train_args(
            tiny_corpus,
            "--train-iters",
            "2",
            *common,
            "--tensor-model-parallel-size",
            "2",
            "--load",
            str(tmp_path / "full"),
            "--checkpoint.load_weights_only",
            "true",
            "--save",
            str(tmp_path / "ft"),
        ),
        nproc=2,
    )
    trained, started = metrics(run), metrics(tmp_path / "ft")
    assert started[1]["loss"] < trained[1]["loss"] - 0.3, (trained, started)  # starts from the trained weights
