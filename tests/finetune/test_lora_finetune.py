"""finetune_glm.py with LoRA end to end: TP=2 equals TP=1, checkpoints hold adapters only and the base's identity,
resume is exact, a resume against another base is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.lora import base_identity
from megatron_glm.parallel.lora import is_lora_name
from tests.finetune.conftest import finetune, read_metrics
from tests.finetune.test_finetune_e2e import _args

pytestmark = pytest.mark.slow

LORA = ("--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "attention.query_key_value,mlp.dense_4h_to_h")


def _losses(save: Path) -> list[float]:
    train, _ = read_metrics(save)
    return [train[s]["loss"] for s in sorted(train)]


def _other_base(setup: dict, where: Path) -> Path:
    """A copy of the base whose one tensor differs (same architecture and tokenizer)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(setup["base"], where)
    (weights,) = sorted(where.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("final_layernorm.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return where


def test_lora_finetune_tp2_matches_resumes_and_refuses_another_base(finetune_setup: dict, tmp_path: Path) -> None:
    s = finetune_setup
    out = finetune(_args(s, "cloze", tmp_path / "tp1", "--train-iters", "4", *LORA))
    assert "LoRA rank 4 on attention.query_key_value, mlp.dense_4h_to_h" in out.stdout, out.stdout
    finetune(
        _args(s, "cloze", tmp_path / "tp2", "--train-iters", "4", "--tensor-model-parallel-size", "2", *LORA), nproc=2
    )
    tp1, tp2 = _losses(tmp_path / "tp1"), _losses(tmp_path / "tp2")
    assert len(tp1) == 4 and tp1[0] != tp1[-1]
    assert max(abs(a - b) for a, b in zip(tp1, tp2, strict=True)) < 1e-5, (tp1, tp2)
    # The checkpoint holds the adapters (and their optimizer state) only, plus the base's identity.
    step = tmp_path / "tp1" / "global_step4"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["lora"]["base_sha256"] == base_identity(s["base"]) and meta["lora"]["rank"] == 4
    (states,) = step.glob("*model_states.pt")
    module = torch.load(states, weights_only=False)["module"]  # our own file, written by this test's run
    assert module and all(is_lora_name(k) for k in module), sorted(module)[:4]
    assert len(module) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)
    # Resume: 2 steps, then the same command for 4: the same losses, bit for bit.
    save = tmp_path / "resumed"
    finetune(_args(s, "cloze", save, "--train-iters", "2", *LORA))
    out = finetune(_args(s, "cloze", save, "--train-iters", "4", *LORA))
    assert "resumed from" in out.stdout
    assert _losses(save) == tp1
    # Another base under the same adapters: refused, one line.
    args = _args(s, "cloze", save, "--train-iters", "5", *LORA)
    args[args.index("--load") + 1] = str(_other_base(s, tmp_path / "other_base"))
    proc = finetune(args, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "its LoRA adapters were trained on base" in lines[0] and "resume against the same base" in lines[0]
