"""finetune_glm.py with LoRA end to end: TP=2 and PP=2 equal TP=1, checkpoints hold adapters only and the
base's identity, resume is exact, a resume against another base is a one-line error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.lora import base_identity
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.parallel.lora import is_lora_name
from tests.finetune.conftest import finetune, read_metrics
from tests.finetune.test_finetune_e2e import _args
from tests.training.conftest import PY, ROOT, run_tool

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


@pytest.fixture(scope="module")
def lora_runs(finetune_setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA fine-tuning of the base for 4 steps at TP=1, TP=2 and PP=2 (``tp1``, ``tp2``, ``pp2``: their --save
    directories)."""
    s, d = finetune_setup, tmp_path_factory.mktemp("lora")
    out = finetune(_args(s, "cloze", d / "tp1", "--train-iters", "4", *LORA))
    assert "LoRA rank 4 on attention.query_key_value, mlp.dense_4h_to_h" in out.stdout, out.stdout
    tp2 = _args(s, "cloze", d / "tp2", "--train-iters", "4", "--tensor-model-parallel-size", "2", *LORA)
    finetune(tp2, nproc=2)
    pp2 = _args(s, "cloze", d / "pp2", "--train-iters", "4", "--pipeline-model-parallel-size", "2", *LORA)
    finetune(pp2, nproc=2)
    return {"tp1": d / "tp1", "tp2": d / "tp2", "pp2": d / "pp2"}


def test_lora_finetune_tp2_matches_resumes_and_refuses_another_base(
    finetune_setup: dict, lora_runs: dict, tmp_path: Path
) -> None:
    s = finetune_setup
    tp1, tp2, pp2 = (_losses(lora_runs[k]) for k in ("tp1", "tp2", "pp2"))
    assert len(tp1) == 4 and tp1[0] != tp1[-1]
    assert max(abs(a - b) for a, b in zip(tp1, tp2, strict=True)) < 1e-5, (tp1, tp2)
    assert max(abs(a - b) for a, b in zip(tp1, pp2, strict=True)) < 1e-5, (tp1, pp2)
    # The checkpoint holds the adapters (and their optimizer state) only, plus the base's identity.
    step = lora_runs["tp1"] / "global_step4"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["lora"]["base_sha256"] == base_identity(s["base"]) and meta["lora"]["rank"] == 4
    (states,) = step.glob("*model_states.pt")
    module = safe_torch_load(states)["module"]
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


def test_merge_lora_writes_the_adapted_model(finetune_setup: dict, lora_runs: dict, tmp_path: Path) -> None:
    """--merge-lora of the TP=2 run: a plain standalone model whose logits equal base + adapters (fp32)."""
    from megatron_glm.checkpoint import load_pretrained
    from megatron_glm.checkpoint.convert import open_source
    from megatron_glm.checkpoint.lora_merge import read_adapters
    from megatron_glm.config import LoraConfig
    from megatron_glm.model import GLMModel, load_full_state_dict
    from megatron_glm.model.lora import attach_lora
    from tests.model.helpers import make_batch

    out = tmp_path / "merged"
    run_tool(
        "tools/convert_checkpoint.py",
        "--input",
        str(lora_runs["tp2"]),
        "--output",
        str(out),
        "--format",
        "safetensors",
        "--merge-lora",
    )
    merged = load_pretrained(out)
    plain_convert = [
        PY,
        "tools/convert_checkpoint.py",
        "--input",
        str(lora_runs["tp1"]),
        "--output",
        str(tmp_path / "x"),
    ]
    proc = subprocess.run(plain_convert, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (
        proc.returncode != 0
        and "a LoRA run's checkpoint (adapters only)" in proc.stderr
        and "--merge-lora" in proc.stderr
    )
    base = open_source(finetune_setup["base"])
    config, layout = base.info.config, base.info.layout
    adapters = read_adapters(lora_runs["tp2"] / "global_step4", layout)
    tp1_adapters = read_adapters(lora_runs["tp1"] / "global_step4", layout)
    assert set(adapters) == set(tp1_adapters) and len(adapters) == 8
    assert max((adapters[k] - tp1_adapters[k]).abs().max().item() for k in adapters) < 1e-5  # TP=2 == TP=1
    pp2_adapters = read_adapters(lora_runs["pp2"] / "global_step4", layout)  # DeepSpeed's per-layer files
    assert set(pp2_adapters) == set(adapters)
    assert max((pp2_adapters[k] - tp1_adapters[k]).abs().max().item() for k in adapters) < 1e-5
    lora = LoraConfig(rank=4, alpha=8.0, targets=[LORA[-1]])
    model = GLMModel(config, seed=1)
    attach_lora(model, lora, layout, seed=1)
    load_full_state_dict(model, {**{n: base.tensor(n) for n in base.names()}, **adapters})
    plain = GLMModel(config, seed=1)
    load_full_state_dict(plain, {n: base.tensor(n) for n in base.names()})
    batch = make_batch(3, vocab=config.vocab_size)
    with torch.no_grad():
        got, want, before = (
            m.eval()(batch["input_ids"], batch["position_ids"], batch["sep"]) for m in (merged, model, plain)
        )
    assert (want - before).abs().max() > 1e-4  # the adapters changed the model
    assert (got - want).abs().max() < 1e-5
