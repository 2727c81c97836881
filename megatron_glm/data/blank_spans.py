"""Span lengths and placement of the token-level blank objective (:mod:`megatron_glm.data.blank_infilling`).

Span lengths follow a Poisson law truncated to ``1..max_block_length`` (:func:`truncated_poisson_pmf`); spans are
placed at least one unmasked token apart inside the maskable segments of a window (:func:`fit_spans` for one
segment, :func:`place_many` for the documents of a packed window).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fit_spans", "place_many", "truncated_poisson_pmf"]

_EMPTY = np.zeros(0, dtype=np.int64)


def truncated_poisson_pmf(mean: float, max_length: int) -> np.ndarray:
    """P(length = k) for k = 1..max_length of Poisson(``mean``) conditioned on that range."""
    k = np.arange(1, max_length + 1)
    log_p = k * math.log(mean) - mean - np.array([math.lgamma(x + 1) for x in k])
    p = np.exp(log_p - log_p.max())
    return p / p.sum()


def fit_spans(lens: np.ndarray, length: int) -> np.ndarray:
    """Drop trailing spans (and clip a lone span) until they fit ``length`` tokens with gaps."""
    total = int(lens.sum()) + len(lens) - 1
    if total <= length:
        return lens
    if length <= 0:
        return _EMPTY
    keep = np.cumsum(lens + 1) - 1 <= length
    lens = lens[keep]
    if len(lens) == 0:
        return np.array([length], dtype=np.int64)
    return lens


def place_many(
    lens: list[int], seg_starts: list[int], seg_lens: list[int], u: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Place spans of ``lens`` inside several segments (a packed window) in plain Python (few, short lists).

    Spans go to the segments in proportion to their lengths (as the original spreads them over
    the documents of a sample); if a segment cannot hold its share, largest spans go first to
    the segment with the most room, shortened if no room is large enough.
    """
    K = len(seg_lens)
    scale = sum(lens) + len(lens)
    scale /= sum(seg_lens) + K
    groups: list[list[int]] = [[] for _ in range(K)]
    k, acc, bound = 0, 0.0, (seg_lens[0] + 1) * scale
    for length in lens:
        mid = acc + (length + 1) / 2.0
        while k < K - 1 and mid > bound:
            k += 1
            bound += (seg_lens[k] + 1) * scale
        groups[k].append(length)
        acc += length + 1
    if any(sum(g) + len(g) - 1 > n for g, n in zip(groups, seg_lens) if g):
        groups = [[] for _ in range(K)]
        room = [n + 1 for n in seg_lens]
        for length in sorted(lens, reverse=True):
            k = max(range(K), key=room.__getitem__)
            if room[k] < 2:
                break
            length = min(length, room[k] - 1)
            groups[k].append(length)
            room[k] -= length + 1
    starts: list[int] = []
    out_lens: list[int] = []
    j = 0
    for seg_start, seg_len, group in zip(seg_starts, seg_lens, groups):
        m = len(group)
        if not m:
            continue
        slots = seg_len - sum(group) - m + 2
        places = sorted(int(x * slots) for x in u[j : j + m])
        j += m
        offset = seg_start
        for i, (place, length) in enumerate(zip(places, group)):
            starts.append(offset + place + i)
            offset += length
        out_lens.extend(group)
    return np.array(starts, dtype=np.int64), np.array(out_lens, dtype=np.int64)
