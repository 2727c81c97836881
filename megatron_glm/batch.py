"""One micro-batch, as the data loader produces it and the model and trainer consume it."""

from __future__ import annotations

from typing import TypedDict

import torch


class Batch(TypedDict, total=False):
    """The documented batch keys (``b`` samples of ``s`` tokens).

    ``input_ids [b, s] long``, ``labels [b, s] long``, ``loss_mask [b, s] float`` (1 on Part B targets; on every
    text target of a causal sample), ``position_ids [b, 2, s] long`` (row 0 position, row 1 block position),
    ``sep [b] long`` (Part A length; 0 for a causal sample), ``objective [b] long`` (index into
    :data:`OBJECTIVE_NAMES`, for per-objective logging); with document isolation
    (``data.objective.reset_attention_mask``) ``doc_ids [b, s] long`` (each token's document in its packed
    window, -1 on padding).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    sep: torch.Tensor
    objective: torch.Tensor
    doc_ids: torch.Tensor


OBJECTIVE_NAMES: tuple[str, ...] = ("token", "sentence", "document", "causal")
"""The pretraining objectives, by their ``objective`` id: the three blank-infilling ones, then the causal
(GLM-4 style) one."""
