"""Which objective a sample uses: the objective ids, the mixture draw and the command tokens each one needs.

The mixture (:class:`~megatron_glm.config.ObjectiveConfig`) draws one uniform number ``r`` per micro-batch
(or per sample with ``per_sample``): token-level blanks when ``r < bert_prob``, sentence-level blanks below
``bert_prob + gap_sentence_prob``, the causal objective below ``bert_prob + gap_sentence_prob + causal_prob``,
else document-level blanks (so with ``causal_prob`` 0 the draw is the original GLM's). A dataset named in
``causal_datasets`` always uses the causal objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_glm.batch import OBJECTIVE_NAMES
from megatron_glm.config.sections import ObjectiveConfig
from megatron_glm.errors import DataError
from megatron_glm.tokens import CommandTokens

__all__ = [
    "BLANK_OBJECTIVES",
    "CAUSAL",
    "DOCUMENT",
    "SENTENCE",
    "TOKEN",
    "ObjectiveChoice",
    "check_objective_tokens",
    "choose_objective",
    "uses_blank_infilling",
]

TOKEN, SENTENCE, DOCUMENT, CAUSAL = (OBJECTIVE_NAMES.index(n) for n in ("token", "sentence", "document", "causal"))
BLANK_OBJECTIVES = (TOKEN, SENTENCE, DOCUMENT)


@dataclass(frozen=True)
class ObjectiveChoice:
    """What is decided once per micro-batch (or per sample with ``per_sample``)."""

    objective: int
    single_span: bool = False
    short_seq: bool = False


def choose_objective(cfg: ObjectiveConfig, rng: np.random.Generator) -> ObjectiveChoice:
    """Draw the objective (and the single-span / short-sequence switches) as the original GLM does."""
    u = rng.random(3)
    short = bool(u[0] < cfg.short_seq_prob)
    single = bool(u[1] < cfg.single_span_prob)
    r = 0.0 if single else float(u[2])
    if r < cfg.bert_prob:
        objective = TOKEN
    elif r < cfg.bert_prob + cfg.gap_sentence_prob:
        objective = SENTENCE
    elif r < cfg.bert_prob + cfg.gap_sentence_prob + cfg.causal_prob:
        objective = CAUSAL
    else:
        objective = DOCUMENT
    return ObjectiveChoice(objective, single, short)


def uses_blank_infilling(cfg: ObjectiveConfig, prefixes: Sequence[str]) -> bool:
    """Whether a blank-infilling objective can be drawn for one of the datasets ``prefixes``."""
    return cfg.causal_prob < 1.0 and any(p not in cfg.causal_datasets for p in prefixes)


def check_objective_tokens(cfg: ObjectiveConfig, special: CommandTokens, blank: bool, tokenizer: str) -> None:
    """One-line :class:`DataError` naming a command token the selected objectives need and the tokenizer
    (``tokenizer``, its path) lacks (id -1): ``[CLS]`` for blank infilling (``blank``), ``[dBLOCK]`` for
    ``block_mask_prob`` / ``context_mask_ratio``. The causal objective needs none beyond the required ones."""
    if blank and special.cls < 0:
        raise DataError(
            f"{tokenizer}: the tokenizer has no [CLS] token, which the blank-infilling objectives start every "
            f"sample with; add it to its special tokens, or train with the causal objective only "
            f"(data.objective.causal_prob 1, or name every dataset in data.objective.causal_datasets)"
        )
    if blank and special.dblock < 0 and (cfg.block_mask_prob > 0 or cfg.context_mask_ratio > 0):
        raise DataError(
            f"{tokenizer}: the tokenizer has no [dBLOCK] token, which block_mask_prob / "
            f"context_mask_ratio > 0 write; add it to its special tokens or set both to 0"
        )
