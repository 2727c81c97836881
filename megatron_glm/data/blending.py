"""Blending several datasets' windows by weight (``--data-path 0.3 A 0.7 B``).

Sample ``i`` of the blend is taken from the dataset whose next sample is most overdue (due times
``(k + 0.5) / w_d``); every dataset's count stays within one of ``w_d * i``. The schedule is cached as ``.npy``
files like the per-dataset indices (:func:`~megatron_glm.data.samples.cached_array`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_glm.data.samples import CACHE_VERSION, DocumentWindows, Window, cached_array, digest

__all__ = ["BlendedWindows", "blend_schedule"]


def blend_schedule(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, its index within that dataset) for ``num_samples`` blended samples.

    Dataset ``d``'s ``k``-th sample is due at ``(k + 0.5) / w_d``; samples are taken in order of due
    time (ties to the lower dataset), so after ``i`` samples dataset ``d`` has given ``w_d * i``
    rounded up or down.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    due, which, index = [], [], []
    for d, weight in enumerate(w):
        count = int(math.ceil(weight * num_samples)) + 1
        k = np.arange(count, dtype=np.int64)
        due.append((k + 0.5) / weight)
        which.append(np.full(count, d, dtype=np.int16))
        index.append(k)
    order = np.argsort(np.concatenate(due), kind="stable")[:num_samples]
    return np.concatenate(which)[order], np.concatenate(index)[order]


class BlendedWindows:
    """Windows drawn from several :class:`DocumentWindows` by weight (``--data-path 0.3 A 0.7 B``)."""

    def __init__(
        self,
        datasets: Sequence[DocumentWindows],
        weights: Sequence[float],
        num_samples: int,
        *,
        cache_dir: str = "",
        build_cache: bool = True,
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("one weight per dataset")
        self.datasets = list(datasets)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.num_samples = max(1, int(num_samples))
        key = digest("glm-blend", CACHE_VERSION, self.weights, self.num_samples, [d.key for d in self.datasets])
        directory = cache_dir or os.path.dirname(os.path.abspath(self.datasets[0].prefix))
        stem = os.path.join(directory, f"blend-{self.datasets[0].name}-{key}")
        built: list[tuple[np.ndarray, np.ndarray]] = []

        def build(part: int) -> np.ndarray:
            if not built:
                built.append(blend_schedule(self.weights, self.num_samples))
            return built[0][part]

        self._paths = (f"{stem}-dataset.npy", f"{stem}-index.npy")
        self._schedule: tuple[np.ndarray, np.ndarray] | None = None
        if build_cache:
            for part, path in enumerate(self._paths):
                cached_array(path, lambda part=part: build(part), True)

    @property
    def schedule(self) -> tuple[np.ndarray, np.ndarray]:
        if self._schedule is None:
            self._schedule = tuple(  # type: ignore[assignment]
                cached_array(path, lambda part=part: blend_schedule(self.weights, self.num_samples)[part], False)
                for part, path in enumerate(self._paths)
            )
        return self._schedule  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_schedule"] = None
        return state

    @property
    def has_sentences(self) -> bool:
        return all(d.has_sentences for d in self.datasets)

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset, window index within it) of blended sample ``index``."""
        which, within = self.schedule
        if index >= len(which):  # past the planned samples: extend the schedule in memory
            self.num_samples = max(2 * self.num_samples, index + 1)
            self._schedule = blend_schedule(self.weights, self.num_samples)
            which, within = self._schedule
        return int(which[index]), int(within[index])

    def window(self, index: int, sentences: bool = False) -> Window:
        d, k = self.locate(int(index))
        return self.datasets[d].window(k, sentences)

    def __len__(self) -> int:
        return self.num_samples
