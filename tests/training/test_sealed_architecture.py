"""A checkpoint's architecture is sealed: trained with post-LN alpha and rotary base 500000, it is resumed,
fine-tuned, evaluated and generated from with that architecture when the command line does not restate it, and
refused (one line naming each differing field) when the command line contradicts it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from megatron_glm.checkpoint.weights import load_model_weights
from megatron_glm.config import load_config
from megatron_glm.generation.loading import load_model
from megatron_glm.model import GLMModel
from tests.model.helpers import make_batch
from tests.training.conftest import PY, ROOT, launch, train_args

pytestmark = pytest.mark.slow
ARCH = ("--model.residual_style", "post_ln_alpha", "--position-embedding-type", "rope", "--rotary-base", "500000")
WANTED = {"residual_style": "post_ln_alpha", "position_embedding_type": "rope", "rotary_base": 500000.0}
SHORT = ("--micro-batch-size", "2", "--global-batch-size", "2")


def _arch(model_config) -> dict:
    return {k: getattr(model_config, k) for k in WANTED}


def _logits(model: GLMModel) -> torch.Tensor:
    batch = make_batch(5, batch=2, seq=32, vocab=2000)
    with torch.no_grad():
        return model(batch["input_ids"], batch["position_ids"], batch["sep"])


def _finetune_dry_run(save: Path, tmp_path: Path, *extra: str, dry: bool = True) -> subprocess.CompletedProcess:
    """finetune_glm.py on a cloze task (``--dry-run`` unless ``dry`` is false), not restating the architecture."""
    task = ["--task", "cloze", "--train-data", str(tmp_path / "t.jsonl"), "--source-length", "20"]
    flags = ["--dry-run"] if dry else []
    cmd = [PY, "finetune_glm.py", *flags, *task, "--target-length", "8", "--load", str(save), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_readers_take_the_checkpoints_architecture_and_refuse_a_contradiction(tiny_corpus: dict, tmp_path: Path):
    save = tmp_path / "ck"
    launch(train_args(tiny_corpus, *ARCH, *SHORT, "--train-iters", "2", "--save", str(save)), launcher="python")
    trained = load_config(train_args(tiny_corpus, *ARCH)).model
    assert _arch(trained) == WANTED

    # Generation and evaluation (tools/generate.py, tools/evaluate.py build their model with load_model): the
    # checkpoint's architecture, and the trained model's logits (another rotary base gives other logits).
    model, _ = load_model(save)
    assert _arch(model.config) == WANTED
    reference = GLMModel(dataclasses.replace(trained, vocab_size=2048, hidden_dropout=0.0, attention_dropout=0.0))
    load_model_weights(reference, str(save), 1, 0)
    assert torch.equal(_logits(model), _logits(reference.eval()))
    other = GLMModel(dataclasses.replace(reference.config, rotary_base=10000.0))
    load_model_weights(other, str(save), 1, 0)
    assert not torch.allclose(_logits(other.eval()), _logits(reference))

    # Fine-tuning without restating the architecture: the configuration it would train is the checkpoint's.
    out = _finetune_dry_run(save, tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout.rsplit("configuration is valid", 1)[0]
    doc = yaml.safe_load(text[text.index("model:\n") :])  # after the accelerator's warning line
    assert _arch(SimpleNamespace(**doc["model"])) == WANTED and doc["model"]["vocab_size"] == 2048
    # ... and the memory and activation lines of pretrain_glm.py --dry-run (shared code), at the task's row length
    rows = out.stdout.splitlines()
    assert any(r.startswith("memory per rank (TP 1 x PP 1 x DP 1, ZeRO 1, fp32;") for r in rows), out.stdout[-2000:]
    seq = doc["data"]["seq_length"]
    head = f"activation memory per rank (seq {seq}, CP 1: {seq} tokens per rank, micro-batch 4, TP 1, "
    assert any(r.startswith(head) and "backward working set" in r for r in rows), out.stdout[-2000:]
    refused = _finetune_dry_run(save, tmp_path, "--context-parallel-size", "2")  # as finetune_glm.py refuses it
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "error: fine-tuning runs without context parallelism: drop --context-parallel-size"
    ], refused.stderr
    # A fine-tuning run (lr 0: the weights stay the trained ones) trains and saves that architecture: its
    # checkpoint records it and generates the trained model's logits.
    examples = [
        {"text": f"line {i} is about [MASK] .", "choices": ["lists", "dicts"], "label": i % 2} for i in range(4)
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    run = [*SHORT, "--train-iters", "1", "--lr", "0", "--save", str(tmp_path / "ft")]
    out = _finetune_dry_run(save, tmp_path, *run, dry=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    meta = json.loads((tmp_path / "ft" / "global_step1" / "meta.json").read_text())
    assert _arch(SimpleNamespace(**meta["config"]["model"])) == WANTED
    tuned, _ = load_model(tmp_path / "ft")
    assert _arch(tuned.config) == WANTED and torch.equal(_logits(tuned), _logits(reference))
    # ... and refused, naming each field, when the command line contradicts it.
    out = _finetune_dry_run(save, tmp_path, "--rotary-base", "10000", "--model.residual_style", "pre_ln")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "contradicts the checkpoint's architecture" in lines[0], out.stderr
    assert "rotary_base: checkpoint 500000.0 vs command line 10000.0" in lines[0]
    assert "residual_style: checkpoint 'post_ln_alpha' vs command line 'pre_ln'" in lines[0]

    # Resume without restating: the checkpoint's architecture, recorded again at the next save.
    proc = launch(train_args(tiny_corpus, *SHORT, "--train-iters", "3", "--save", str(save), "--load", str(save)))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    meta = json.loads((save / "global_step3" / "meta.json").read_text())
    assert _arch(SimpleNamespace(**meta["config"]["model"])) == WANTED
    # Resume or weights-only loading that contradicts it: one line naming the field, nothing trained.
    for extra in ((), ("--checkpoint.load_weights_only", "true", "--save", str(tmp_path / "new"))):
        args = train_args(tiny_corpus, *SHORT, "--rotary-base", "10000", "--train-iters", "4", "--load", str(save))
        proc = launch([*args, *extra], launcher="python", check=False)
        assert proc.returncode != 0
        tail = proc.stderr.strip().splitlines()
        assert len(tail) == 1 and "rotary_base: checkpoint 500000.0 vs command line 10000.0" in tail[0], proc.stderr
    assert not (save / "global_step4").exists() and not (tmp_path / "new").exists()
