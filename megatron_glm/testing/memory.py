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


def reset_peak_rss() -> int:
    """Reset this process's resident-set high-water mark (Linux ``clear_refs``) and return the current resident
    set in bytes: a later :func:`peak_rss` minus this is the peak growth in between, whatever allocated it
    (torch, DeepSpeed, Python)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """This process's resident-set high-water mark in bytes since the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")
