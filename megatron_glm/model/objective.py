"""The one loss protocol: ``loss(output, batch) -> GLMLoss``.

The model (whole, or the pipeline's last stage) hands its loss a :class:`ModelOutput`: the final hidden states,
the head that turns them into logits, and the auxiliary loss terms its layers added. The loss gets the labels as a
:class:`LossBatch`. Pretraining (:class:`LanguageModelLoss`, inside ``GLMModel.forward``), the pipeline engine's
``loss_fn`` (``megatron_glm.training.pipeline.PipelineLoss`` adapts the engine's call) and fine-tuning
(``megatron_glm.finetune.loss.TaskLoss``) all implement :class:`LossFunction`; :func:`head_loss` is their shared
head + cross entropy (on the loss rows only, fused with the head when ``head_chunk_size > 0``) and
:func:`with_aux` adds the auxiliary terms to the total.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from megatron_glm.model.attention import QueryRows
from megatron_glm.model.loss import LM_PART, GLMLoss, glm_loss_at, glm_loss_fused, loss_positions
from megatron_glm.model.mtp import MTP_TERM, shifted
from megatron_glm.parallel import ParallelState, copy_to_tensor_parallel_region


class Head(Protocol):
    """What a loss needs of the model's head (``GLMModel``, or the pipeline's head stage)."""

    parallel_state: ParallelState
    head_grad_scale: float
    training: bool

    @property
    def head_chunk_size(self) -> int: ...

    @property
    def head_weight(self) -> torch.Tensor: ...

    def logits(self, h: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ModelOutput:
    """The final hidden states and what the loss needs besides the labels.

    ``hidden``: ``[b, s, H]``, or the rows at flat ``positions`` (into ``b * s``) ``[n, H]`` when the last layer ran
    on the loss rows only. ``head``: turns hidden states into this rank's vocabulary slice of the logits.
    ``aux``: named scalar loss terms added by layers, summed into the total by :func:`with_aux`. ``carrier``: the
    pipeline's auxiliary-loss accumulator; the total depends on it so its gradient reaches every stage. ``mtp``:
    the MTP layers' normed outputs ``[b, s, H]`` (``megatron_glm.model.mtp``; empty without them), whose loss
    times ``mtp_weight`` :func:`with_aux` adds as the term ``mtp``.
    """

    hidden: torch.Tensor
    head: Head
    positions: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    carrier: torch.Tensor | None = None
    mtp: tuple[torch.Tensor, ...] = ()
    mtp_weight: float = 0.0


@dataclass
class LossBatch:
    """The labels side of a micro-batch: ``labels`` and ``loss_mask`` ``[b, s]``, the per-sample ``objective``
    ``[b]`` (pretraining objective or fine-tuning row kind; optional) and the host-found loss ``rows``."""

    labels: torch.Tensor
    loss_mask: torch.Tensor
    objective: torch.Tensor | None = None
    rows: QueryRows | None = None

    @classmethod
    def of(cls, batch: dict[str, Any]) -> LossBatch:
        """From a batch dict (``loss_rows``: the trainer's host-found rows, when there)."""
        return cls(batch["labels"], batch["loss_mask"], batch.get("objective"), batch.get("loss_rows"))

    def positions(self) -> torch.Tensor:
        """Flat indices (into ``b * s``) of the rows carrying loss."""
        return loss_positions(self.loss_mask) if self.rows is None else self.rows.flat


class LossFunction(Protocol):
    """``loss(output, batch) -> GLMLoss``: what pretraining, the pipeline and fine-tuning compute."""

    def __call__(self, output: ModelOutput, batch: LossBatch) -> GLMLoss: ...


def head_loss(output: ModelOutput, batch: LossBatch, label_smoothing: float = 0.0) -> GLMLoss:
    """GLM's masked cross entropy of ``output``: the head run on the loss rows only, fused with the cross entropy in
    chunks of ``head.head_chunk_size`` rows when that is positive (no ``[n, V]`` logits stored)."""
    head, labels, loss_mask = output.head, batch.labels, batch.loss_mask
    if output.positions is not None:
        rows, positions = output.hidden, output.positions
    else:
        positions = batch.positions()
        b, s = labels.shape
        rows = output.hidden.reshape(b * s, output.hidden.shape[-1]).index_select(0, positions)
    ps, chunk = head.parallel_state, head.head_chunk_size
    if chunk <= 0:
        return glm_loss_at(head.logits(rows), positions, labels, loss_mask, ps, label_smoothing=label_smoothing)
    return glm_loss_fused(
        copy_to_tensor_parallel_region(rows, ps.tp_group),
        head.head_weight,
        positions,
        labels,
        loss_mask,
        ps,
        chunk=chunk,
        label_smoothing=label_smoothing,
        grad_scale=head.head_grad_scale,
    )


def mtp_loss(hidden: tuple[torch.Tensor, ...], head: Head, batch: LossBatch, weight: float = 1.0) -> torch.Tensor:
    """``weight`` times the mean over the MTP layers of each one's masked cross entropy: layer ``k``'s outputs
    against ``labels`` and ``loss_mask`` moved ``k + 1`` positions back (``megatron_glm.model.mtp``)."""
    total = hidden[0].new_zeros((), dtype=torch.float32)
    for k, out in enumerate(hidden):
        moved = LossBatch(shifted(batch.labels, k + 1), shifted(batch.loss_mask, k + 1), batch.objective)
        total = total + head_loss(ModelOutput(out, head), moved).loss
    return total * (weight / len(hidden))


def with_aux(loss: GLMLoss, output: ModelOutput, batch: LossBatch | None = None) -> GLMLoss:
    """``loss`` with ``output``'s auxiliary terms added to the total (by name order) and recorded in ``aux``; with
    ``batch``, the MTP layers' weighted loss too (the term ``mtp``: ``mtp_weight`` x :func:`mtp_loss`). With any
    term, ``parts`` (logged apart) holds ``lm`` (``loss`` before the terms), ``mtp`` (the MTP loss unweighted) and
    each other term as added: the total is ``lm + mtp_weight x mtp + sum of the others``."""
    terms, parts = dict(output.aux), {}
    if output.mtp and batch is not None:
        parts[MTP_TERM] = mtp_loss(output.mtp, output.head, batch)
        terms[MTP_TERM] = parts[MTP_TERM] * output.mtp_weight
    if not terms and output.carrier is None:
        return loss
    total = loss.loss
    for name in sorted(terms):
        total = total + terms[name]
    if output.carrier is not None and not output.aux:  # the accumulator still gets its (zero) gradient
        total = total + output.carrier.sum() * 0.0
    parts = {LM_PART: loss.loss, **terms, **parts} if terms else {}
    return dataclasses.replace(
        loss, loss=total, aux={**loss.aux, **terms}, parts={n: v.detach() for n, v in parts.items()}
    )


class LanguageModelLoss:
    """The pretraining loss: :func:`head_loss` plus the auxiliary terms."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, output: ModelOutput, batch: LossBatch) -> GLMLoss:
        return with_aux(head_loss(output, batch, self.label_smoothing), output, batch)
