"""Elastic restarts: a run resumed on another number of processes continues the straight run's losses.

One chain of short runs, each resuming the previous one's checkpoint in a new layout (pairs, not the
product): PP2 -> PP1 (native conversion), DP1 -> DP2 ZeRO-1 (first refused with the convert command, then
the command from the message run as printed: a universal checkpoint), DP2 ZeRO-1 -> TP2 ZeRO-2 (universal)
and TP2 ZeRO-2 -> TP1 (native). Dropout is off, so every layout computes the same losses up to fp32
reduction order; each run must continue the data position and match the straight run's losses, and every
conversion must carry Adam's moments (equal to the source's, nonzero).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.checkpoint.manager import verify_checkpoint
from tests.training.conftest import launch, metrics, run_tool

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # fp32 reduction-order noise is ~1e-7 at this size; a dropped Adam state moves losses ~1e-2
LAYOUTS = {  # name -> (processes, flags)
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp1": (1, []),
    "dp2": (2, []),
    "tp2z2": (2, ["--tensor-model-parallel-size", "2", "--zero-stage", "2"]),
}


def run(corpus: dict, layout: str, save: Path, *extra: str, check: bool = True):
    nproc, flags = LAYOUTS[layout]
    args = [
        *shlex.split(
            "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 "
            "--global-batch-size 4 --lr 1e-3 --seed 1234 --split 98,2,0 --log-interval 1 --train-iters 10 "
            "--lr-decay-iters 10 --eval-interval 0 --model.hidden_dropout 0 --model.attention_dropout 0"
        ),
        *("--data-path", corpus["data_path"], "--tokenizer-model", corpus["tokenizer"], "--save", str(save)),
        *flags,
        *extra,
    ]
    return launch(args, nproc=nproc, launcher="python" if nproc == 1 else "torchrun", check=check)


def convert(src: Path, out: Path, **opts) -> Path:
    convert_checkpoint(src, out, ConvertOptions(**opts), log=lambda _: None)
    return out


def assert_moments_carried(src: Path, out: Path) -> None:
    """Adam's moments of the converted checkpoint equal the source's (merged) and are not zero."""
    a, b = open_source(src), open_source(out)
    for name in ("word_embeddings.weight", "transformer.layers.1.attention.query_key_value.weight"):
        sa, sb = a.optimizer_state(name), b.optimizer_state(name)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[key], sb[key]), f"{out}: {name} {key} differs from the source"
            assert sb[key].abs().max() > 0, f"{out}: {name} {key} is zero (optimizer state dropped?)"


def resume(corpus: dict, straight: dict, layout: str, load: Path, save: Path, start: int, stop: int) -> float:
    """Resume ``load`` in ``layout`` and train ``start+1 .. stop``; returns the max |loss diff| to straight."""
    proc = run(corpus, layout, save, "--load", str(load), "--exit-interval", str(stop))
    assert f"at step {start} ({start * 4} samples)" in proc.stdout  # the data position continues
    rows = metrics(save)
    assert sorted(rows) == list(range(start + 1, stop + 1)), proc.stdout[-2000:]
    assert [rows[s]["consumed_samples"] for s in rows] == [straight[s]["consumed_samples"] for s in rows]
    latest = (save / "latest").read_text().strip()
    assert latest == f"global_step{stop}" and verify_checkpoint(save / latest) is None
    return max(abs(rows[s]["loss"] - straight[s]["loss"]) for s in rows)


def test_resume_on_other_layouts_carries_optimizer_and_losses(tiny_corpus: dict, tmp_path: Path) -> None:
    ref = tmp_path / "straight_pp2"
    run(tiny_corpus, "pp2", ref, "--save-interval", "2", "--checkpoint.keep_last", "0")
    straight = metrics(ref)
    assert sorted(straight) == list(range(1, 11))
    diffs = {}

    # PP2 -> PP1 (one process): the native converter reads every stage's ZeRO-1 files
    pp1 = convert(ref / "global_step2", tmp_path / "pp1_ckpt", format="native", target_pp=1, target_dp=1)
    assert_moments_carried(ref / "global_step2", pp1)
    diffs["pp2->pp1"] = resume(tiny_corpus, straight, "dp1", pp1, tmp_path / "dp1", 2, 4)

    # DP1 -> DP2: refused with the exact command, which is then run as printed
    refused = run(tiny_corpus, "dp2", tmp_path / "refused", "--load", str(tmp_path / "dp1"), check=False)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]  # each worker's one line
    assert errors and "saved with dp=1 but this run has dp=2" in errors[0], refused.stderr[-3000:]
    line = errors[0]
    command = re.search(r"with: (python tools/convert_checkpoint\.py [^,]*), then resume with --load (\S+)$", line)
    assert command, line
    run_tool(*shlex.split(command.group(1))[1:])
    universal = Path(command.group(2))
    assert verify_checkpoint(universal / "global_step4") is None
    assert_moments_carried(tmp_path / "dp1" / "global_step4", universal)
    diffs["dp1->dp2 zero1"] = resume(tiny_corpus, straight, "dp2", universal, tmp_path / "dp2", 4, 6)

    # DP2 ZeRO-1 -> TP2 x DP1 ZeRO-2 (universal: DeepSpeed cuts QKV's packed blocks and partitions)
    uni = convert(tmp_path / "dp2" / "global_step6", tmp_path / "dp2_universal", format="universal")
    assert_moments_carried(tmp_path / "dp2" / "global_step6", uni)
    diffs["dp2 zero1->tp2 zero2"] = resume(tiny_corpus, straight, "tp2z2", uni, tmp_path / "tp2", 6, 8)

    # TP2 ZeRO-2 -> TP1 (native resharding of weights and moments)
    tp1 = convert(tmp_path / "tp2" / "global_step8", tmp_path / "tp1_ckpt", format="native", target_tp=1, target_dp=1)
    assert_moments_carried(tmp_path / "tp2" / "global_step8", tp1)
    diffs["tp2->tp1"] = resume(tiny_corpus, straight, "dp1", tp1, tmp_path / "tp1", 8, 10)

    print(f"max |loss - straight loss| after each layout change: {diffs}")
    assert max(diffs.values()) < TOLERANCE, diffs
