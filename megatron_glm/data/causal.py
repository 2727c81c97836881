"""The causal objective in GLM-4's input format: ``[gMASK]<sop>`` then the text, next-token loss on all of it.

From a window (its first token is the ``[CLS]`` slot, dropped here; documents are closed by ``[eos]``), every
document piece ``x_1..x_k`` of the window is laid out as::

    input_ids  [gMASK] <sop> x_1 .. x_k
    labels     <sop>   x_1   x_2 .. [eos]         (the next token)
    loss_mask  0       1     1   .. 1             (the last 1 only when [eos] closes the piece in the window)

so the loss covers every text token and the end of text closing a document (GLM-4's ``<|endoftext|>``); a
piece the window cuts (a document running on into the next window) has no target after its last token
(label ``[pad]``, loss 0), and an empty piece (a window that starts at a document's ``[eos]``) is skipped.
Pieces follow each other in window order and the whole is cut to ``seq_length`` (the cut keeps the right
labels: each is the next token of its piece) and padded (``[pad]``, position 0, loss 0).

Attention is causal: ``sep`` is 0 (GLM's mask ``j < sep or j <= i`` is then the lower triangle). Positions are
1-D as transformers' ``GlmForCausalLM`` counts them: row 0 runs 0..n-1 over the sample, row 1 (block
positions) is 0. With document isolation (``reset_attention_mask``) every piece is a document of its own
(``doc_ids``) and its positions restart at 0, so a packed piece is computed exactly as it would be alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_glm.config.sections import ObjectiveConfig
from megatron_glm.data.char_boundaries import CharBoundaries
from megatron_glm.data.objective_choice import CAUSAL
from megatron_glm.tokens import CommandTokens

__all__ = ["CausalSamples"]

#: Tokens each piece adds in front of its text: ``[gMASK]`` and ``<sop>``.
PREFIX = 2


class CausalSamples:
    """Builds fixed-length causal samples (GLM-4's ``[gMASK]<sop>`` format) from token windows.

    Uses ``gmask``, ``sop``, ``eos`` and ``pad`` of ``special`` (never ``[CLS]``); ``chars`` (byte-fallback
    character boundaries) drops the continuation bytes a window cut inside a character starts with.
    """

    def __init__(
        self, objective: ObjectiveConfig, special: CommandTokens, seq_length: int, chars: CharBoundaries | None = None
    ) -> None:
        if seq_length < PREFIX + 1:
            raise ValueError(f"seq_length must be at least {PREFIX + 1}, got {seq_length}")
        self.isolate = bool(objective.reset_attention_mask)
        self.special = special
        self.chars = chars
        self.seq_length = int(seq_length)

    def pieces(self, tokens: np.ndarray) -> list[tuple[np.ndarray, bool]]:
        """``(text, closed)`` of each non-empty document piece of the window ``tokens`` (``[CLS]`` slot first)."""
        text = tokens[1 : self.seq_length]
        if self.chars is not None and len(text):
            text = text[self.chars.orphans(text, -1)[1] :]
        ends = np.flatnonzero(text == self.special.eos).tolist()
        out: list[tuple[np.ndarray, bool]] = []
        start = 0
        for end in ends:
            if end > start:
                out.append((text[start:end], True))
            start = end + 1
        if start < len(text):
            out.append((text[start:], False))
        return out

    def sample(self, tokens: np.ndarray) -> dict[str, Any]:
        """One sample from the window ``tokens`` (int64; its first token is the ``[CLS]`` slot)."""
        sp, L = self.special, self.seq_length
        rows = np.zeros((5, L), dtype=np.int64)  # input ids, labels, positions, (block positions), documents
        rows[:2] = sp.pad
        rows[4] = -1
        loss_mask = np.zeros(L, dtype=np.float32)
        at = 0
        for doc, (text, closed) in enumerate(self.pieces(tokens)):
            if at >= L:
                break
            k = len(text)
            size = min(k + PREFIX, L - at)
            piece = slice(at, at + size)
            rows[0, piece] = np.concatenate(([sp.gmask, sp.sop], text))[:size]
            rows[1, piece] = np.concatenate(([sp.sop], text, [sp.eos if closed else sp.pad]))[:size]
            loss_mask[at + 1 : at + size] = 1.0
            if size == k + PREFIX and not closed:
                loss_mask[at + size - 1] = 0.0  # the window cut the document: no next token
            rows[2, piece] = np.arange(size) if self.isolate else np.arange(at, at + size)
            rows[4, piece] = doc
            at += size
        sample = {
            "input_ids": rows[0],
            "labels": rows[1],
            "loss_mask": loss_mask,
            "position_ids": rows[2:4],
            "sep": 0,
            "objective": CAUSAL,
        }
        if self.isolate:
            sample["doc_ids"] = rows[4]
        return sample
