"""GLM tokenizer: any sentencepiece model plus GLM's command tokens appended after its vocabulary.

The command tokens (``[pad]``, ``[eos]``, ``[CLS]``, ``[MASK]``, ``[sMASK]``, ``[gMASK]``, ``[sop]``,
``[eop]``, ``[dBLOCK]``, ``[UNK]``, ``[SEP]``) take the ids ``base_size, base_size + 1, ...`` in that
order, so every id is unique (the original Chinese 10B tokenizer gave ``[gMASK]`` and ``[eop]`` the
same id; here uniqueness is checked on construction).

:meth:`GLMTokenizer.encode` maps command tokens written in the text (``"The capital is [MASK]."``)
to their ids; :meth:`GLMTokenizer.decode` writes them back as text, so ``decode(encode(text)) ==
text`` for a model trained with the identity normalisation and byte fallback (as
``tools/train_tokenizer.py`` trains them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import sentencepiece as spm

from megatron_glm.errors import DataError

__all__ = ["COMMAND_TOKENS", "GLMTokenizer"]

#: (attribute stem, text) of each command token, in id order after the base vocabulary.
COMMAND_TOKENS: tuple[tuple[str, str], ...] = (
    ("pad", "[pad]"),
    ("eos", "[eos]"),
    ("cls", "[CLS]"),
    ("mask", "[MASK]"),
    ("smask", "[sMASK]"),
    ("gmask", "[gMASK]"),
    ("sop", "[sop]"),
    ("eop", "[eop]"),
    ("dblock", "[dBLOCK]"),
    ("unk", "[UNK]"),
    ("sep", "[SEP]"),
)


class GLMTokenizer:
    """A sentencepiece model with GLM's command tokens appended.

    Attributes ``pad_id, eos_id, cls_id, mask_id, smask_id, gmask_id, sop_id, eop_id, dblock_id,
    unk_id, sep_id`` are the command token ids; ``command_tokens`` maps the same stems (``"mask"``)
    to ids. ``vocab_size`` counts the base pieces and the command tokens (unpadded); the embedding
    size is :meth:`padded_vocab_size`.
    """

    pad_id: int
    eos_id: int
    cls_id: int
    mask_id: int
    smask_id: int
    gmask_id: int
    sop_id: int
    eop_id: int
    dblock_id: int
    unk_id: int
    sep_id: int

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise DataError(f"{self.model_path}: tokenizer model not found")
        with open(self.model_path, "rb") as stream:
            proto = stream.read()
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, TypeError) as exc:
            raise DataError(f"{self.model_path}: not a sentencepiece model ({exc})") from None
        self._sp = sp
        self._encode_plain = sp.EncodeAsIds
        self.base_vocab_size = sp.GetPieceSize()
        if self.base_vocab_size <= 0:
            raise DataError(f"{self.model_path}: sentencepiece model has no pieces")
        self.command_tokens: dict[str, int] = {}
        self._text_of: dict[int, str] = {}
        self._id_of_text: dict[str, int] = {}
        for offset, (stem, text) in enumerate(COMMAND_TOKENS):
            token_id = self.base_vocab_size + offset
            self.command_tokens[stem] = token_id
            self._text_of[token_id] = text
            self._id_of_text[text] = token_id
            setattr(self, f"{stem}_id", token_id)
        ids = list(self.command_tokens.values())
        if len(set(ids)) != len(ids) or min(ids) < self.base_vocab_size:
            raise DataError(f"{self.model_path}: command token ids {ids} are not unique after the base vocab")
        self.vocab_size = self.base_vocab_size + len(COMMAND_TOKENS)
        # Longest first so that no token text shadows a longer one that starts the same way.
        texts = sorted(self._id_of_text, key=len, reverse=True)
        self._special = re.compile("(" + "|".join(re.escape(t) for t in texts) + ")")

    @property
    def command_token_ids(self) -> dict[str, int]:
        """``{"[pad]": id, ..., "[SEP]": id}``: every command token's text and id."""
        return dict(self._id_of_text)

    # -- encoding ------------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        With ``allow_special`` (the default) command tokens written in the text map to their ids;
        without it they are tokenized as ordinary text (what preprocessing does with a corpus).
        """
        if not allow_special or "[" not in text:
            return self._encode_plain(text)
        ids: list[int] = []
        for i, part in enumerate(self._special.split(text)):
            if i % 2:
                ids.append(self._id_of_text[part])
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

    def decode(self, ids: Iterable[int] | Any) -> str:
        """Text of ``ids`` (a list, numpy array or tensor); command tokens are written as their text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        parts: list[str] = []
        run: list[int] = []
        base = self.base_vocab_size
        for token in ids:
            token = int(token)
            if 0 <= token < base:
                run.append(token)
                continue
            text = self._text_of.get(token)
            if text is None:
                raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
            if run:
                parts.append(self._sp.DecodeIds(run))
                run = []
            parts.append(text)
        if run:
            parts.append(self._sp.DecodeIds(run))
        return "".join(parts)

    def id_to_token(self, token_id: int) -> str:
        """The piece (or command token text) of ``token_id``."""
        token_id = int(token_id)
        if 0 <= token_id < self.base_vocab_size:
            return self._sp.IdToPiece(token_id)
        text = self._text_of.get(token_id)
        if text is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return text

    def token_to_id(self, token: str) -> int:
        """The id of a command token text (``"[MASK]"``) or of a base piece; raises ``KeyError``."""
        if token in self._id_of_text:
            return self._id_of_text[token]
        token_id = self._sp.PieceToId(token)
        if token_id == self._sp.unk_id() and self._sp.IdToPiece(token_id) != token:
            raise KeyError(f"{token!r} is not a token of {self.model_path}")
        return token_id

    # -- sizes ---------------------------------------------------------------------------------------

    def padded_vocab_size(self, tp_size: int = 1, divisible_by: int = 128) -> int:
        """``vocab_size`` rounded up to a multiple of ``divisible_by * tp_size`` (Megatron's rule)."""
        if tp_size < 1 or divisible_by < 1:
            raise ValueError(f"tp_size ({tp_size}) and divisible_by ({divisible_by}) must be positive")
        multiple = divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple

    def __len__(self) -> int:
        return self.vocab_size

    # -- pickling (for DataLoader workers) ------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.model_path = state["model_path"]
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"GLMTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
