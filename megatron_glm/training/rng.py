"""Capture and restore every RNG stream a training rank uses (exact resume)."""

from __future__ import annotations

import random
from typing import Any

import torch

from megatron_glm.parallel import RNGStatesTracker


def get_rng_state(tracker: RNGStatesTracker | None = None) -> dict[str, Any]:
    """Plain-data RNG state of this rank: torch CPU, CUDA (if any), Python, and the TP tracker."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict[str, Any], tracker: RNGStatesTracker | None = None) -> None:
    """Inverse of :func:`get_rng_state` (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and "tracker" in state:
        tracker.set_states(state["tracker"])


def seed_everything(seed: int, pp_rank: int = 0) -> None:
    """Seed torch (CPU and CUDA) and Python; pipeline stages get distinct streams (Megatron's offset).

    Tensor- and data-parallel ranks share the default stream (replicated dropout agrees across TP ranks);
    the model's tracker holds the per-TP-rank stream.
    """
    value = seed + 100 * pp_rank
    random.seed(value)
    torch.manual_seed(value)
