"""Iteration ranges as written on the command line: ``--skip-train-iteration-range 101-200 1500-1500``."""

from __future__ import annotations

import re

from megatron_glm.errors import ConfigError

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_iteration_ranges(
    specs: list[str], where: str = "training.skip_train_iteration_range"
) -> list[tuple[int, int]]:
    """``["A-B", ...]`` -> sorted inclusive ``(A, B)`` pairs with ``1 <= A <= B``; overlaps are merged."""
    out: list[tuple[int, int]] = []
    for spec in specs:
        m = _RANGE.match(str(spec))
        if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
            raise ConfigError(f"{where}: expected ranges of steps like '101-200' with 1 <= start <= end, got {spec!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(out):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def in_ranges(step: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``step`` lies in one of the inclusive ``ranges``."""
    return any(a <= step <= b for a, b in ranges)
