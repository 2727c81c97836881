"""A model about to be loaded is built on the meta device: no random init drawn, the checkpoint's values bit for bit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint
from megatron_glm.checkpoint.weights import load_glm_model, load_model_weights
from megatron_glm.config import GLMConfig
from megatron_glm.generation.loading import load_model
from megatron_glm.model import GLMModel
from megatron_glm.parallel import ParallelState
from megatron_glm.training.setup import build_model
from tests.checkpoint.helpers import logits_of, reference_model, write_glm_files
from tests.model.helpers import tiny_config

PARTITION_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Every ``Tensor.normal_`` call (the random init draws each weight with it), by shape."""
    calls: list[tuple[int, ...]] = []
    original = torch.Tensor.normal_

    def counting(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", counting)
    return calls


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_loaded_model_equals_the_checkpoint_bitwise_without_a_random_init(
    tmp_path: Path, draws: list[tuple[int, ...]], tp_rank: int
) -> None:
    _, full = reference_model(seed=3)
    write_glm_files(tmp_path / "glm", full, tp=2)
    ps = ParallelState(tp_size=2, tp_rank=tp_rank)
    cfg = tiny_config()

    old = GLMModel(cfg, ps, seed=5)  # the old way: the random init, then the load over it
    assert draws, "the counter sees the random init"
    load_model_weights(old, tmp_path / "glm", ps.tp_size, ps.tp_rank)
    draws.clear()
    new, path = load_glm_model(cfg, tmp_path / "glm", ps, seed=5)
    assert draws == []  # not one weight drawn
    assert path == str(tmp_path / "glm")

    want, got = _state(old), _state(new)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    old_params, new_params = dict(old.named_parameters()), dict(new.named_parameters())
    for name, p in new_params.items():
        for attr in PARTITION_ATTRIBUTES:  # to_empty alone would drop them (the optimizer and clipping read them)
            assert getattr(p, attr, "unset") == getattr(old_params[name], attr, "unset"), (name, attr)
        assert p.requires_grad
    assert new.rng_tracker.device == old.rng_tracker.device
    assert all(torch.equal(new.rng_tracker.states[k], old.rng_tracker.states[k]) for k in old.rng_tracker.states)


def test_generation_and_training_loads_skip_the_init_and_match(tmp_path: Path, draws: list[tuple[int, ...]]) -> None:
    model, full = reference_model(seed=4)
    write_glm_files(tmp_path / "glm", full, tp=2)
    st = tmp_path / "st"  # a format that records the whole architecture (the glm files lack the head count)
    convert_checkpoint(tmp_path / "glm", st, ConvertOptions(format="safetensors", num_attention_heads=4), log=print)
    want = logits_of(model)

    draws.clear()
    loaded, _ = load_model(st)
    assert draws == []
    assert torch.equal(logits_of(loaded), want)

    cfg = GLMConfig()
    cfg = dataclasses.replace(cfg, model=tiny_config(hidden_dropout=0.0, attention_dropout=0.0))
    lines: list[str] = []
    built = build_model(cfg, ParallelState(), torch.device("cpu"), weights=str(st), log=lines.append)
    assert draws == []
    assert lines == [f"loaded model weights from {st}; optimizer and schedule start fresh"]
    assert built.rng_tracker is built.module.rng_tracker
    assert torch.equal(logits_of(built.module.eval()), want)

    scratch = build_model(cfg, ParallelState(), torch.device("cpu"))  # training from scratch: the init as before
    assert draws
    reference = GLMModel(cfg.model, seed=cfg.training.seed)
    assert all(torch.equal(a, b) for a, b in zip(_state(scratch.module).values(), _state(reference).values()))
