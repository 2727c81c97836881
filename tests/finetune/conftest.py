"""Fixtures for end-to-end fine-tuning: a tokenizer on the embedded corpus, a glm-tiny standalone checkpoint,
the worked example's tasks, and a launcher for finetune_glm.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.training.conftest import PY, ROOT, _free_port, run_tool


@pytest.fixture(scope="session")
def finetune_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A standalone glm-tiny (seed-initialised, vocab 2048, 512 positions) with a 2,000-piece tokenizer,
    and small cloze / seq2seq task files built by the worked example's builder."""
    import torch

    from megatron_glm.checkpoint.formats.standalone import write_standalone
    from megatron_glm.config import build_config
    from megatron_glm.model import GLMModel, full_state_dict

    d = tmp_path_factory.mktemp("finetune")
    run_tool("tools/export_pydoc_corpus.py", "--output", str(d / "pydoc.jsonl"))
    run_tool(
        "tools/train_tokenizer.py",
        "--input",
        str(d / "pydoc.jsonl"),
        "--vocab-size",
        "2000",
        "--model-prefix",
        str(d / "tok"),
        "--threads",
        "1",
    )
    run_tool("examples/finetune/build_tasks.py", "--output", str(d / "tasks"), "--max-chars", "80", "--max-valid", "8")
    config = build_config({"model.size": "glm-tiny", "model.vocab_size": 2048}).model
    weights = full_state_dict(GLMModel(config, seed=7))

    class Source:
        def names(self) -> list[str]:
            return list(weights)

        def tensor(self, name: str) -> torch.Tensor:
            return weights[name]

        def release(self) -> None:
            pass

    write_standalone(
        Source(),
        d / "base",
        config,
        transform=lambda _n, t: t,
        dtype=torch.float32,
        tokenizer_files=[str(d / "tok.model")],
    )
    return {"base": d / "base", "tasks": d / "tasks", "tokenizer": d / "tok.model"}


def finetune(args: list[str], nproc: int = 1, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run finetune_glm.py: plain python for one process, torchrun otherwise."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [PY, "finetune_glm.py", *args]
    else:
        cmd = [
            str(Path(PY).parent / "torchrun"),
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "finetune_glm.py",
            *args,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        assert proc.returncode == 0, f"finetune failed ({proc.returncode}):\n{tail}"
    return proc


def read_metrics(save: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """``(training rows, evaluation rows)`` of ``save/metrics.jsonl`` by step."""
    train, evals = {}, {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        (train if "loss" in row else evals)[row["step"]] = row
    return train, evals


@pytest.fixture(scope="session")
def chat_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GLM-4-shaped release written by transformers (``GlmForCausalLM``, a BPE ``tokenizer.json`` with GLM-4's
    chat tokens, no chat template of its own) and the chat example's conversations (``chat_{train,valid}.jsonl``)."""
    d = tmp_path_factory.mktemp("chat")
    run_tool("tools/export_pydoc_corpus.py", "--output", str(d / "pydoc.jsonl"))
    tok = ("--vocab-size", "2000", "--model-prefix", str(d / "bpe"), "--threads", "1")
    run_tool("tools/train_tokenizer.py", "--type", "bpe", "--input", str(d / "pydoc.jsonl"), *tok)
    run_tool("examples/make_tiny_glm4_release.py", "--tokenizer", str(d / "bpe.json"), "--output", str(d / "release"))
    run_tool("examples/build_chat_data.py", "--output", str(d / "chat"), "--max-train", "64", "--max-valid", "4")
    return {
        "release": d / "release",
        "train": d / "chat_train.jsonl",
        "valid": d / "chat_valid.jsonl",
        "tokenizer_file": d / "bpe.json",
    }
