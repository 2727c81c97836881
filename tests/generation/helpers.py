"""A small GLM with random (non-degenerate) weights and synthetic command tokens for generation tests."""

from __future__ import annotations

import torch

from megatron_glm.generation import InfillTokens
from megatron_glm.model import GLMModel, load_full_state_dict
from tests.model.helpers import VOCAB, random_full_state_dict, tiny_config

# Command tokens at the top of the 128-row test vocabulary.
TOKENS = InfillTokens(pad=121, eos=121, cls=120, mask=125, smask=126, gmask=124, sop=122, eop=123, dblock=127)
MASK, SMASK, GMASK = 125, 126, 124
#: Prompts of different lengths: two blanks, a trailing [gMASK], three blanks.
PROMPTS = [
    [120, 5, 6, MASK, 7, 8, 9, SMASK, 10],
    [120, 11, 12, GMASK],
    [120, 1, 2, 3, MASK, 4, 5, 6, 7, MASK, 8, 9, 10, 11, MASK, 12],
]


def full_weights(seed: int = 11) -> dict[str, torch.Tensor]:
    """Random full state dict of the tiny test model (weights large enough that greedy choices vary)."""
    return random_full_state_dict(GLMModel(tiny_config()), seed)


def tiny_model(weights: dict[str, torch.Tensor] | None = None, parallel_state=None, **overrides) -> GLMModel:
    """The tiny test model (any TP size) holding ``weights`` (default :func:`full_weights`), in eval mode."""
    model = GLMModel(tiny_config(**overrides), parallel_state, seed=0)
    weights = weights if weights is not None else full_weights()
    load_full_state_dict(model, weights, parallel_state)
    return model.eval()


__all__ = ["GMASK", "MASK", "PROMPTS", "SMASK", "TOKENS", "VOCAB", "full_weights", "tiny_model"]
