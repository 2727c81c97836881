"""A word-level stand-in tokenizer on the ids of the tiny test model (``tests/generation/helpers``)."""

from __future__ import annotations

import zlib
from typing import ClassVar

from tests.generation.helpers import GMASK, MASK, SMASK, TOKENS

BASE = 110  # ids 0..109 are words; 120.. are the command tokens of the tiny test vocabulary


class WordTokenizer:
    """Each whitespace-separated word is one id (a stable hash); command tokens written in the text map to
    the tiny model's command ids."""

    vocab_size = 120
    cls_id, pad_id, sop_id, eop_id = TOKENS.cls, TOKENS.pad, TOKENS.sop, TOKENS.eop
    mask_id, smask_id, gmask_id = MASK, SMASK, GMASK
    _special: ClassVar[dict[str, int]] = {"[MASK]": MASK, "[sMASK]": SMASK, "[gMASK]": GMASK, "[CLS]": TOKENS.cls}

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        out = []
        for word in text.split():
            if allow_special and word in self._special:
                out.append(self._special[word])
            else:
                out.append(zlib.crc32(word.encode()) % BASE)
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    def token_to_id(self, token: str) -> int:
        return self._special[token]
