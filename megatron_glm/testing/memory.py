"""Peak tensor memory of a function on CPU, from the profiler's allocation events.

CPU has no ``max_memory_allocated``; the profiler (``profile_memory=True``) records every allocation and
free with its size, so replaying them in time order gives the live-bytes curve and its peak. The figure
is tensor memory allocated *while* the function runs above what was live before (parameters and inputs
are not counted; gradients allocated in backward are).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile


def peak_memory(fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """``(peak bytes above the start, bytes still live at the end, fn())``.

    Frees of tensors allocated before the call count negative, so ``end`` can be below zero.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live, result
