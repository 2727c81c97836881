"""Prompts for blank infilling: the command tokens generation uses, a prompt's encoding and blanks, and the
result of filling them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_glm.tokens import CommandTokens

InfillTokens = CommandTokens
"""The command-token ids generation uses (the package-wide bundle)."""


@dataclass
class InfillResult:
    """One prompt's Part A (``prompt``), its blank positions and one answer (token ids) per blank."""

    prompt: list[int]
    blanks: list[int]
    answers: list[list[int]]
    score: float | None = None
    """Beam search: the length-normalised log-probability of the returned hypothesis."""
    extra: dict[str, Any] = field(default_factory=dict)

    def filled(self) -> list[int]:
        """The prompt with every blank replaced by its answer."""
        out: list[int] = []
        answers = dict(zip(self.blanks, self.answers))
        for p, t in enumerate(self.prompt):
            out.extend(answers.get(p, [t]))
        return out


_BLANK_TEXT = re.compile(r"(\[MASK\]|\[sMASK\]|\[gMASK\])")


def encode_prompt(tokenizer: Any, text: str, tokens: InfillTokens | None = None) -> list[int]:
    """``[CLS]`` + the tokens of ``text`` (``[MASK]``, ``[sMASK]``, ``[gMASK]`` written in it become blanks);
    ``[gMASK]`` is appended when the text has no blank.

    Spaces right before a blank are dropped: in training a masked span carries its own leading space
    (``green▁apples▁in`` -> ``green [MASK] ▁in``), so ``"green [MASK] in"`` is encoded the same way and the
    answer brings the space back.
    """
    tokens = tokens or InfillTokens.from_tokenizer(tokenizer)
    ids = [tokens.cls]
    parts = _BLANK_TEXT.split(text)
    for i, part in enumerate(parts):
        if i % 2:
            ids.extend(tokenizer.encode(part))
            continue
        if i + 1 < len(parts):
            part = part.rstrip(" ")
        if part:
            ids.extend(tokenizer.encode(part))
    if not any(t in tokens.blanks for t in ids):
        ids.append(tokens.gmask)
    return ids


def blank_positions(ids: Sequence[int], tokens: InfillTokens) -> list[int]:
    """Positions of the blanks of ``ids``, left to right."""
    return [p for p, t in enumerate(ids) if t in tokens.blanks]
