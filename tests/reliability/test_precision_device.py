"""fp16 on a CPU (issue 27, defect 7) is a configuration error found by validation (``--dry-run`` included), one
line naming the flag and suggesting --bf16, not DeepSpeed's ValueError after start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_glm.config import load_config, validate
from megatron_glm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = "training.precision fp16 (--fp16) is not supported on a CPU; use --bf16 (or fp32)"


def test_validation_refuses_fp16_on_a_cpu_only() -> None:
    cfg = load_config(["--fp16"])
    with pytest.raises(
        ConfigError, match=r"^invalid configuration: .*" + MESSAGE.replace("(", r"\(").replace(")", r"\)")
    ):
        validate(cfg, 1, "cpu")
    validate(cfg, 1, "cuda")
    validate(load_config(["--bf16"]), 1, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid where a GPU is visible")
@pytest.mark.parametrize("dry_run", [True, False])
def test_pretrain_refuses_fp16_on_a_cpu_in_one_line(dry_run: bool) -> None:
    args = ["--fp16", "--model-size", "glm-tiny"] + (
        ["--dry-run"] if dry_run else ["--data-path", "none", "--tokenizer-model", "none"]
    )
    proc = subprocess.run(
        [sys.executable, "pretrain_glm.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: invalid configuration: {MESSAGE}"], proc.stderr
