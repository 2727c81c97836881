"""The architecture's family check runs once per model: GLMModel checks itself, a pipeline model is checked by its
builder once, not by each of its parts."""

from __future__ import annotations

import pytest

import megatron_glm.model.glm as glm
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel, GLMPart, ModelLayout
from megatron_glm.parallel import ParallelState
from megatron_glm.training.pipeline import build_pipeline_model
from tests.model.helpers import tiny_config


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = glm.family_problems

    def counting(config: ModelConfig, tp: int) -> list[str]:
        calls.append(tp)
        return original(config, tp)

    monkeypatch.setattr(glm, "family_problems", counting)
    return calls


def test_a_model_is_checked_once_and_its_parts_not_again(checks: list[int]) -> None:
    cfg = tiny_config()
    GLMModel(cfg)
    assert checks == [1]
    parts = [GLMPart(pipe, cfg) for pipe in ModelLayout(cfg).pipe_layers]
    assert len(parts) > 3 and checks == [1]


def test_the_pipeline_builder_checks_the_family_before_building_a_part(checks: list[int]) -> None:
    bad = tiny_config(rotary_percent=1.5)
    with pytest.raises(ValueError, match=r"model.rotary_percent must be in \(0, 1\], got 1.5"):
        build_pipeline_model(bad, ParallelState(pp_size=2))
    assert checks == [1]
    with pytest.raises(ValueError, match="vocab_size must be resolved"):
        build_pipeline_model(tiny_config(vocab_size=0), ParallelState(pp_size=2))
