"""Held-out loss and perplexity, overall and per objective: the one routine behind the trainer's evaluation
and ``megatron_glm.generation.evaluate_loss``.

Per-objective sums are ``{objective id: [loss sum, token count]}`` (``-1``: batches without an
``objective``); ratios of sums reduced over ranks are exact token-weighted means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from megatron_glm.batch import OBJECTIVE_NAMES, Batch
from megatron_glm.model import GLMLoss, add_group_sums

NO_OBJECTIVE = -1
PPL_CAP = 50.0  # perplexity of a loss above this is reported as exp(50)

Sums = dict[int, list[float]]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, PPL_CAP))


def add_loss(sums: Sums, out: GLMLoss, batch: Batch) -> None:
    """Add one micro-batch's loss sums into ``sums``, by objective when the batch has one."""
    objective = batch.get("objective")
    if objective is None:
        add_group_sums(sums, {NO_OBJECTIVE: (float(out.sample_sum.sum()), float(out.sample_tokens.sum()))})
    else:
        add_group_sums(sums, out.by_group(objective))


@torch.no_grad()
def accumulate_losses(forward: Callable[[Batch], GLMLoss], batches: Iterator[Batch], num_batches: int) -> Sums:
    """Loss sums of up to ``num_batches`` batches (``forward(batch)`` gives each one's :class:`GLMLoss`)."""
    sums: Sums = {}
    for _ in range(num_batches):
        try:
            batch = next(batches)
        except StopIteration:
            break
        add_loss(sums, forward(batch), batch)
    return sums


def summarize_losses(sums: Sums, reduce: Callable[[list[float]], list[float]] = lambda v: v) -> dict[str, float]:
    """``tokens``, ``loss``, ``ppl`` and ``loss_<objective>`` / ``ppl_<objective>`` (objectives with tokens).

    ``reduce`` sums a flat list over ranks (one collective; every rank calls it)."""
    flat = [sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())]
    for k in range(len(OBJECTIVE_NAMES)):
        flat += sums.get(k, [0.0, 0.0])
    flat = reduce(flat)
    out: dict[str, float] = {"tokens": flat[1]}
    if flat[1]:
        out["loss"] = flat[0] / flat[1]
        out["ppl"] = perplexity(out["loss"])
    for k, name in enumerate(OBJECTIVE_NAMES):
        loss_sum, tokens = flat[2 + 2 * k], flat[3 + 2 * k]
        if tokens > 0:
            out[f"loss_{name}"] = loss_sum / tokens
            out[f"ppl_{name}"] = perplexity(loss_sum / tokens)
    return out
