"""The objective mixture a dataset samples from: GLM's blank infilling and GLM-4's causal objective.

:class:`Objectives` draws the objective (:func:`~megatron_glm.data.objective_choice.choose_objective`) and builds
the sample with :class:`~megatron_glm.data.blank_infilling.BlankInfilling` or
:class:`~megatron_glm.data.causal.CausalSamples`. Blank infilling needs a ``[CLS]`` token; a tokenizer without one
(GLM-4's) serves the causal objective alone (:func:`~megatron_glm.data.objective_choice.check_objective_tokens`
says so in one line when a blank objective is selected).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_glm.config.sections import ObjectiveConfig
from megatron_glm.data.blank_infilling import BlankInfilling
from megatron_glm.data.causal import CausalSamples
from megatron_glm.data.char_boundaries import CharBoundaries
from megatron_glm.data.objective_choice import CAUSAL, ObjectiveChoice, choose_objective
from megatron_glm.errors import DataError
from megatron_glm.tokens import CommandTokens

__all__ = ["Objectives"]


class Objectives:
    """Samples of any objective of the mixture ``objective``, ``seq_length`` tokens each.

    Call :meth:`choose` once per micro-batch (or sample) with that group's generator, then :meth:`sample` per
    sample with the sample's own generator (the causal objective draws nothing from it).
    """

    def __init__(
        self, objective: ObjectiveConfig, special: CommandTokens, seq_length: int, chars: CharBoundaries | None = None
    ) -> None:
        self.cfg = objective
        self.special = special
        self.chars = chars
        self.blank = BlankInfilling(objective, special, seq_length, chars) if special.cls >= 0 else None
        """None for a tokenizer without ``[CLS]`` (then only the causal objective can be sampled)."""
        self.causal = CausalSamples(objective, special, seq_length, chars)

    def choose(self, rng: np.random.Generator) -> ObjectiveChoice:
        return choose_objective(self.cfg, rng)

    def sample(
        self,
        tokens: np.ndarray,
        rng: np.random.Generator,
        choice: ObjectiveChoice,
        sentence_starts: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """One sample of ``choice``'s objective from the window ``tokens`` (``[CLS]`` slot first)."""
        if choice.objective == CAUSAL:
            return self.causal.sample(tokens)
        if self.blank is None:
            raise DataError("the tokenizer has no [CLS] token, which the blank-infilling objectives need")
        return self.blank.sample(tokens, rng, choice, sentence_starts)
