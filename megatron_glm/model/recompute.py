"""Activation recomputation that replays the tensor-parallel dropout streams exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from megatron_glm.parallel import RNGStatesTracker

__all__ = ["checkpointed"]


def checkpointed(
    fn: Callable[..., torch.Tensor], tracker: RNGStatesTracker | None, *args: torch.Tensor
) -> torch.Tensor:
    """``fn(*args)`` under non-reentrant activation checkpointing with identical dropout on recompute.

    ``torch.utils.checkpoint`` restores the default RNG state(s) for the recompute; the tracker's
    forked states (attention dropout) are restored here too, then put back to where the forward left them.
    """
    if tracker is None:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    before = tracker.get_states()
    calls = 0

    def run(*inner: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*inner)
        after = tracker.get_states()
        tracker.set_states(before)
        try:
            return fn(*inner)
        finally:
            tracker.set_states(after)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
