"""A model about to be loaded is built on the meta device: no random init drawn, the checkpoint's values bit for bit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint
from megatron_glm.checkpoint.weights import load_glm_model, load_model_weights
from megatron_glm.config import GLMConfig, build_config
from megatron_glm.generation.loading import load_model
from megatron_glm.model import GLMModel
from megatron_glm.parallel import ParallelState
from megatron_glm.testing import run_distributed
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


def _safetensors_checkpoint(tmp_path: Path, seed: int) -> Path:
    """A checkpoint recording the whole architecture (tiny_config), random non-trivial weights."""
    _, full = reference_model(seed=seed)
    write_glm_files(tmp_path / "glm", full, tp=1)
    st = tmp_path / "st"
    convert_checkpoint(tmp_path / "glm", st, ConvertOptions(format="safetensors", num_attention_heads=4), log=print)
    return st


def _pp_config(pp: int) -> GLMConfig:
    cfg = build_config(
        {
            "training.zero_stage": 0,
            "parallel.pipeline_model_parallel_size": pp,
            "training.micro_batch_size": 1,
            "training.global_batch_size": 2,
        }
    )
    return dataclasses.replace(cfg, model=tiny_config(hidden_dropout=0.0, attention_dropout=0.0))


def _pp_stage_builds(rank: int, world: int, st: str) -> dict:
    """On each of 2 pipeline stages: the init draws of a stage built the old way (random init, then the load), of
    a stage built for the load (``weights=``) and for a resume, and whether the loaded states are equal bitwise."""
    import deepspeed

    from megatron_glm.parallel import initialize_parallel_state
    from megatron_glm.training import setup

    deepspeed.init_distributed(dist_backend="gloo")
    ps = initialize_parallel_state(1, 2)
    cfg = _pp_config(2)
    calls: list[tuple[int, ...]] = []
    original = torch.Tensor.normal_

    def counting(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    torch.Tensor.normal_ = counting
    old = setup._build(cfg, ps, torch.device("cpu"), None, for_loading=False)
    drawn_old = len(calls)
    load_model_weights(old.module, st, 1, 0)
    calls.clear()
    new = build_model(cfg, ps, torch.device("cpu"), weights=st)
    drawn_new = len(calls)
    calls.clear()
    build_model(cfg, ps, torch.device("cpu"), resume=True)
    drawn_resume = len(calls)
    torch.Tensor.normal_ = original
    want, got = _state(old.module), _state(new.module)
    old_params = dict(old.module.named_parameters())
    attrs = all(
        getattr(p, a, "unset") == getattr(old_params[n], a, "unset")
        for n, p in new.module.named_parameters()
        for a in PARTITION_ATTRIBUTES
    )
    return {
        "old": drawn_old,
        "new": drawn_new,
        "resume": drawn_resume,
        "names": sorted(want),
        "equal": want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want),
        "attributes": attrs,
    }


@pytest.mark.slow
def test_a_pipeline_stage_about_to_be_loaded_draws_no_init(tmp_path: Path) -> None:
    """PP=2: each stage built for a weights-only start or a resume draws no random init; loaded, it equals the stage
    built the old way (random init, then the load) bitwise."""
    st = _safetensors_checkpoint(tmp_path, seed=6)
    results = run_distributed(_pp_stage_builds, 2, str(st), timeout=600)
    assert all(r["old"] > 0 for r in results), "the counter sees each stage's random init"
    assert [(r["new"], r["resume"]) for r in results] == [(0, 0), (0, 0)]
    assert all(r["equal"] and r["attributes"] for r in results)
    assert results[0]["names"] != results[1]["names"]  # two stages, each holding its share


def test_a_resumed_model_draws_no_init(draws: list[tuple[int, ...]], tmp_path: Path) -> None:
    """The trainer's resume (``build_model(resume=True)``, the engine then restores every weight): no random init;
    the module is the initialised one's in names, shapes, dtypes and partition attributes, its dropout stream equal."""
    cfg, ps = _pp_config(1), ParallelState()
    scratch = build_model(cfg, ps, torch.device("cpu"))
    assert draws
    draws.clear()
    resumed = build_model(cfg, ps, torch.device("cpu"), resume=True)
    assert draws == []
    want, got = dict(scratch.module.named_parameters()), dict(resumed.module.named_parameters())
    assert [(k, v.shape, v.dtype, v.device) for k, v in want.items()] == [
        (k, v.shape, v.dtype, v.device) for k, v in got.items()
    ]
    assert all(getattr(got[k], a, "unset") == getattr(want[k], a, "unset") for k in want for a in PARTITION_ATTRIBUTES)
    streams = zip(resumed.rng_tracker.states.values(), scratch.rng_tracker.states.values())
    assert all(torch.equal(a, b) for a, b in streams)
    resumed.module.load_state_dict(scratch.module.state_dict())  # what the engine's load does
    assert torch.equal(logits_of(resumed.module.eval()), logits_of(scratch.module.eval()))
