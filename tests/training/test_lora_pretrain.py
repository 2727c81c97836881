"""pretrain_glm.py with LoRA: adapters on a base given by --lora-base, its identity recorded, resume exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_glm.checkpoint.lora import base_identity
from tests.training.conftest import launch, metrics, train_args

pytestmark = pytest.mark.slow

LORA = ("--lora-rank", "4", "--lora-alpha", "8", "--lr-decay-iters", "4")  # one schedule for 2 + 2 and 4 steps


def test_lora_pretraining_on_a_base_resumes_exactly(tiny_corpus: dict, tmp_path: Path) -> None:
    launch(train_args(tiny_corpus, "--train-iters", "2", "--save", str(tmp_path / "base")), launcher="python")
    base = tmp_path / "base" / "global_step2"
    refused = launch(train_args(tiny_corpus, "--train-iters", "2", *LORA), launcher="python", check=False)
    assert refused.returncode != 0 and "pass --lora-base PATH" in refused.stderr, refused.stderr[-2000:]
    run = ("--lora-base", str(base), *LORA)
    full = tmp_path / "full"
    out = launch(train_args(tiny_corpus, "--train-iters", "4", "--save", str(full), *run), launcher="python")
    assert "LoRA rank 4 on attention.query_key_value, attention.dense" in out.stdout
    meta = json.loads((full / "global_step4" / "meta.json").read_text())
    assert meta["lora"]["base_sha256"] == base_identity(base) == base_identity(base / "manifest.json")
    # Two steps, then resume for two more from --load: the same losses, bit for bit.
    split = tmp_path / "split"
    launch(train_args(tiny_corpus, "--train-iters", "2", "--save", str(split), *run), launcher="python")
    out = launch(
        train_args(tiny_corpus, "--train-iters", "4", "--save", str(split), "--load", str(split), *run),
        launcher="python",
    )
    assert "resumed from" in out.stdout
    want, got = metrics(full), metrics(split)
    assert [got[s]["loss"] for s in sorted(got)] == [want[s]["loss"] for s in sorted(want)]
    assert want[1]["loss"] != want[4]["loss"]
