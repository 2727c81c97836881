"""Fixtures for end-to-end training tests: the embedded corpus, a tokenizer and a preprocessed dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def run_tool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The quick start's data steps: pydoc corpus -> BPE tokenizer -> sentence-split indexed dataset."""
    d = tmp_path_factory.mktemp("corpus")
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
    run_tool(
        "tools/preprocess_data.py",
        "--input",
        str(d / "pydoc.jsonl"),
        "--tokenizer-model",
        str(d / "tok.model"),
        "--output-prefix",
        str(d / "pydoc"),
        "--split-sentences",
        "--workers",
        "1",
    )
    return {"data_path": str(d / "pydoc_text_sentence"), "tokenizer": str(d / "tok.model")}


def train_args(corpus: dict[str, str], *extra: str) -> list[str]:
    """A small, fast, deterministic glm-tiny run (fp32, no dropout)."""
    return [
        "--model-size",
        "glm-tiny",
        "--seq-length",
        "64",
        "--data-path",
        corpus["data_path"],
        "--tokenizer-model",
        corpus["tokenizer"],
        "--model.vocab_size",
        "2048",
        "--lr",
        "2e-3",
        "--model.hidden_dropout",
        "0",
        "--model.attention_dropout",
        "0",
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--bert-prob",
        "0.5",
        "--gap-sentence-prob",
        "0.25",
        *extra,
    ]


def launch(
    args: list[str], nproc: int = 1, launcher: str = "torchrun", timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run pretrain_glm.py under a launcher, as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bindir = Path(PY).parent
    if launcher == "python":  # one process, no launcher: what the user sees is exactly our output
        cmd = [PY, "pretrain_glm.py", *args]
    elif launcher == "deepspeed":
        cmd = [
            str(bindir / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "pretrain_glm.py",
            *args,
        ]
    else:
        cmd = [
            str(bindir / "torchrun"),
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "pretrain_glm.py",
            *args,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{tail}"
    return proc


def _free_port() -> int:
    from megatron_glm.testing import find_free_port

    return find_free_port()


def metrics(save_dir: Path) -> dict[int, dict]:
    """``metrics.jsonl`` of a run, by step (training lines only)."""
    out = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row
    return out
