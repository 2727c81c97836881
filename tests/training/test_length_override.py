"""A length recipe step (issue 28): continued pretraining from a checkpoint with a raised rotary base and a longer
sequence is an explicit, logged override of the sealed architecture; without the flag, or for a shape field, it is
refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_glm.generation.loading import load_model
from megatron_glm.model import full_state_dict
from tests.model.helpers import make_batch
from tests.training.conftest import launch, train_args

pytestmark = pytest.mark.slow
ROPE = ("--position-embedding-type", "rope", "--model.block_position_encoding", "false")
SHORT = ("--micro-batch-size", "2", "--global-batch-size", "2", "--max-position-embeddings", "64")
LONGER = ("--seq-length", "128", "--max-position-embeddings", "128", "--rotary-base", "1000000")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    batch = make_batch(5, batch=2, seq=48, vocab=2000)
    with torch.no_grad():
        return model(batch["input_ids"], batch["position_ids"], batch["sep"])


def _one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_continued_pretraining_with_a_new_rotary_base_and_length(tiny_corpus: dict, tmp_path: Path) -> None:
    short = tmp_path / "4k"
    launch(train_args(tiny_corpus, *ROPE, *SHORT, "--train-iters", "2", "--save", str(short)), launcher="python")
    saved = json.loads((short / "global_step2" / "meta.json").read_text())["config"]["model"]
    assert (saved["rotary_base"], saved["max_sequence_length"]) == (10000.0, 64)

    # Continue (weights only, lr 0 so the weights stay the loaded ones) at 128 tokens with base 1e6.
    longer = tmp_path / "32k"
    cont = [*SHORT, *LONGER, "--load", str(short), "--checkpoint.load_weights_only", "true"]
    cont += ["--lr", "0", "--train-iters", "1"]
    flag = ("--override-architecture", "rotary_base,max_position_embeddings")
    proc = launch(train_args(tiny_corpus, *cont, *flag, "--save", str(longer)), launcher="python")
    wanted = (
        f"architecture override: max_sequence_length 64 -> 128, rotary_base 10000.0 -> 1000000.0 "
        f"(checkpoint {short / 'global_step2' / 'meta.json'})"
    )
    assert wanted in proc.stdout + proc.stderr
    assert "seq 128" in proc.stdout  # it trained at the new length
    # The new checkpoint records the new base and length; every other field is the checkpoint's.
    model = json.loads((longer / "global_step1" / "meta.json").read_text())["config"]["model"]
    assert (model["rotary_base"], model["max_sequence_length"]) == (1000000.0, 128)
    assert {k: v for k, v in model.items() if k not in ("rotary_base", "max_sequence_length")} == {
        k: v for k, v in saved.items() if k not in ("rotary_base", "max_sequence_length")
    }
    # The weights are the loaded ones; the logits are those of the new rotary base (other than the old model's).
    old, _ = load_model(short)
    new, _ = load_model(longer)
    assert new.config.rotary_base == 1000000.0 and old.config.rotary_base == 10000.0
    old_weights, new_weights = full_state_dict(old), full_state_dict(new)
    assert old_weights.keys() == new_weights.keys()
    assert all(torch.equal(old_weights[k], new_weights[k]) for k in old_weights)
    assert not torch.allclose(_logits(old), _logits(new), atol=1e-4)

    # Without the flag: refused, naming each field; nothing saved.
    refused = tmp_path / "refused"
    proc = launch(train_args(tiny_corpus, *cont, "--save", str(refused)), launcher="python", check=False)
    line = _one_line_error(proc)
    assert "contradicts the checkpoint's architecture" in line and "allow them with --override-architecture" in line
    assert "max_sequence_length: checkpoint 64 vs command line 128" in line
    assert "rotary_base: checkpoint 10000.0 vs command line 1000000.0" in line
    # A shape field cannot be overridden: one line.
    shape = ("--override-architecture", "rotary_base,hidden_size", "--hidden-size", "128")
    proc = launch(train_args(tiny_corpus, *cont, *shape, "--save", str(refused)), launcher="python", check=False)
    line = _one_line_error(proc)
    assert line.endswith("need no flag)") and "--override-architecture hidden_size: changes the weights' shapes" in line
    assert not refused.exists()
