"""Seeded init and the RNG tracker used for dropout inside tensor-parallel regions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_glm.config import GLMConfig
from megatron_glm.config.loader import leaf_paths
from megatron_glm.parallel import RNGStatesTracker, normal_init, stable_seed


def test_normal_init_is_seeded_and_independent_of_global_rng() -> None:
    a, b = torch.empty(3, 4), torch.empty(3, 4)
    torch.manual_seed(0)
    normal_init(0.02, 5)(a)
    torch.manual_seed(99)
    normal_init(0.02, 5)(b)
    assert torch.equal(a, b)
    normal_init(0.02, 6)(b)
    assert not torch.equal(a, b)
    assert abs(a.std().item() - 0.02) < 0.02


def test_stable_seed_is_deterministic_and_distinct() -> None:
    assert stable_seed(1, "w") == stable_seed(1, "w")
    assert len({stable_seed(1, "w"), stable_seed(2, "w"), stable_seed(1, "v")}) == 3


def test_tracker_fork_isolates_streams() -> None:
    tracker = RNGStatesTracker()
    torch.manual_seed(0)
    tracker.add("tp", 123)
    with tracker.fork("tp"):
        first = torch.rand(4)
    default = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(default, torch.rand(4))  # the fork did not advance the default stream
    with tracker.fork("tp"):
        second = torch.rand(4)
    assert not torch.equal(first, second)  # the forked stream advanced
    saved = tracker.get_states()
    with tracker.fork("tp"):
        third = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork("tp"):
        assert torch.equal(third, torch.rand(4))  # restoring states replays the stream
    with pytest.raises(ValueError):
        tracker.add("tp", 1)
    with pytest.raises(KeyError), tracker.fork("missing"):
        pass


def test_every_config_field_is_documented() -> None:
    for path, (f, _tp) in leaf_paths(GLMConfig).items():
        assert f.metadata.get("help"), f"{path} has no help text"
    sections = [s for s in dataclasses.fields(GLMConfig) if not s.metadata.get("internal")]
    assert all(dataclasses.is_dataclass(getattr(GLMConfig(), s.name)) for s in sections)
    # the internal fields (what the user set explicitly) are bookkeeping, not options
    assert [s.name for s in dataclasses.fields(GLMConfig) if s.metadata.get("internal")] == ["explicit"]
