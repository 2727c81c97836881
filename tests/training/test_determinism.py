"""``--deterministic``: deterministic kernels and the cuBLAS workspace setting, and a run that still trains."""

from __future__ import annotations

import os
import re

import pytest
import torch

from megatron_glm.config import load_config
from megatron_glm.training.determinism import apply_determinism
from tests.training.conftest import launch, train_args


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic = before[1]


@pytest.mark.usefixtures("restore_determinism")
def test_flag_sets_what_it_should(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(["--deterministic"]).training.deterministic
    assert load_config(["--deterministic-mode"]).training.deterministic  # Megatron's spelling
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    apply_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    apply_determinism(True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other reproducible setting is kept
    apply_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")  # one that is not reproducible is replaced
    apply_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.slow
def test_a_deterministic_run_trains(tiny_corpus) -> None:
    proc = launch(train_args(tiny_corpus, "--train-iters", "3", "--deterministic"), launcher="python")
    assert "deterministic kernels" in proc.stdout, proc.stdout[-2000:]
    assert re.search(r"^step\s+3\s+loss", proc.stdout, re.M), proc.stdout[-2000:]
