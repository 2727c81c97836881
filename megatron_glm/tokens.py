"""GLM's command-token ids, as one bundle for the objectives (data) and for generation."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class CommandTokens:
    """The command-token ids (taken from a tokenizer, or given in tests and benchmarks)."""

    pad: int
    eos: int
    cls: int
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    dblock: int

    @property
    def blanks(self) -> tuple[int, int, int]:
        """Ids that mark a blank: ``[MASK]``, ``[sMASK]``, ``[gMASK]``."""
        return (self.mask, self.smask, self.gmask)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, optional: Collection[str] = ()) -> CommandTokens:
        """Read ``pad_id, eos_id, cls_id, ...`` from a :class:`~megatron_glm.data.tokenizer.GLMTokenizer`.

        A tokenizer for generation only may lack ``eos_id`` (then ``[pad]``, as in the original GLM) and
        ``dblock_id`` (then -1: generation never uses it). The stems in ``optional`` (e.g. ``("cls",)`` for the
        data pipeline, which checks per objective) are -1 when missing; any other missing one is the
        tokenizer's one-line error."""
        fallback = {"eos": getattr(tokenizer, "pad_id", -1), "dblock": -1, **dict.fromkeys(optional, -1)}
        return cls(
            **{
                f.name: int(
                    getattr(tokenizer, f"{f.name}_id", fallback[f.name])
                    if f.name in fallback
                    else getattr(tokenizer, f"{f.name}_id")  # a missing one: the tokenizer's one-line error
                )
                for f in fields(cls)
            }
        )


#: GLM-4's chat-turn markers: a causal continuation ends at them as at end of text (GLM-4's generation_config.json
#: lists the three as its ``eos_token_id``).
CHAT_STOP_TOKENS = ("<|user|>", "<|observation|>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a causal continuation: end of text, then the chat-turn markers the tokenizer has."""
    ids = [int(tokenizer.eos_id)]
    for text in CHAT_STOP_TOKENS:
        try:
            token_id = int(tokenizer.token_to_id(text))
        except KeyError:
            continue
        if token_id not in ids:
            ids.append(token_id)
    return ids
