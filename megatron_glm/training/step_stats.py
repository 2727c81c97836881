"""One logging window's loss statistics: the total's sum, the per-objective sums and the loss's parts.

The logged ``loss`` is the total that is back-propagated; with auxiliary terms (GLM-4.5's MTP layers, the MoE
balance loss) its parts are logged apart, each averaged over micro-batches and data-parallel ranks as the loss is:
``lm_loss`` (the language-model loss alone), ``mtp_loss`` (the MTP layers' mean loss, unweighted) and
``moe_aux_loss`` (the balance loss as added, its coefficient included), so that
``loss = lm_loss + mtp_loss_weight x mtp_loss + moe_aux_loss``. Under pipelining only the last stage computes them
(:class:`~megatron_glm.training.pipeline.PipelineLoss` collects them); the other stages count no micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.model.context import aux_loss_names
from megatron_glm.model.loss import LM_PART
from megatron_glm.model.mtp import MTP_TERM


def loss_part_names(config: ModelConfig) -> tuple[str, ...]:
    """The parts of the loss logged apart (:attr:`~megatron_glm.model.loss.GLMLoss.parts`, logged as
    ``{name}_loss``): ``lm`` and the auxiliary terms by name, or none for a model without auxiliary terms."""
    terms = (*aux_loss_names(config), *((MTP_TERM,) if config.num_nextn_predict_layers else ()))
    return (LM_PART, *sorted(terms)) if terms else ()


@dataclass
class PartSums:
    """Sums of the loss's parts over micro-batches (left on the device: no host synchronisation) and how many
    micro-batches gave them."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    micro_batches: int = 0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        """One micro-batch's :attr:`~megatron_glm.model.loss.GLMLoss.parts` (nothing when it has none)."""
        if parts:
            self.merge(PartSums({name: value.detach().double() for name, value in parts.items()}, 1))

    def merge(self, other: PartSums) -> None:
        for name, value in other.sums.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro_batches += other.micro_batches

    def values(self, names: tuple[str, ...]) -> list[float]:
        """The sums of ``names`` (0 for one not seen) and the micro-batch count: what is summed over ranks."""
        if not names:
            return []
        return [*(float(self.sums[n]) if n in self.sums else 0.0 for n in names), float(self.micro_batches)]


def part_means(names: tuple[str, ...], summed: list[float]) -> dict[str, float]:
    """``{name}_loss``: the means of :meth:`PartSums.values` summed over ranks."""
    if not names:
        return {}
    count = summed[-1]
    return {f"{n}_loss": (s / count if count else float("nan")) for n, s in zip(names, summed, strict=False)}


@dataclass
class StepStats:
    """Loss sums and token counts of one step (per objective), reduced over data-parallel ranks when logged.

    ``loss_sum`` (float64) and ``objectives`` (:meth:`~megatron_glm.model.loss.GLMLoss.group_sums`) stay on the
    device until the log step reads them: accumulating them costs no host synchronisation. ``parts``: the loss's
    parts (module docstring)."""

    loss_sum: float | torch.Tensor = 0.0
    micro_batches: int = 0
    objectives: torch.Tensor | None = None
    nonfinite: int = 0
    lr: float = 0.0
    parts: PartSums = field(default_factory=PartSums)

    def merge(self, other: StepStats) -> None:
        """Add ``other`` (a later step) into this logging window."""
        self.loss_sum += other.loss_sum
        self.micro_batches += other.micro_batches
        self.nonfinite += other.nonfinite
        self.lr = other.lr
        self.add_objectives(other.objectives)
        self.parts.merge(other.parts)

    def add_objectives(self, sums: torch.Tensor | None) -> None:
        if sums is not None:
            self.objectives = sums if self.objectives is None else self.objectives + sums
