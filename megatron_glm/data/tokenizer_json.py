"""A GLM tokenizer read with the ``tokenizers`` library: a ``tokenizer.json`` (GLM-4-9B-hf, GLM-4-0414,
GLM-4.5, or one ``tools/train_tokenizer.py --type bpe`` trained) or a tiktoken BPE file.

The vocabulary, the special tokens and their ids are the tokenizer's own; GLM's command tokens are found among
its added tokens (see :mod:`megatron_glm.data.tokenizer_base`). Preprocessing encodes with
:meth:`JsonTokenizer.encode_batch` (``encode_batch_fast``, no special tokens added, special-token text in the
corpus kept as text): the ids are ``tokenizers``' own. ``tokenizers`` may spread a batch over its own threads
(``TOKENIZERS_PARALLELISM`` / ``RAYON_NUM_THREADS``); the preprocessing workers turn that off, each worker
being one core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from megatron_glm.data.tiktoken_file import build_tiktoken_tokenizer, byte_to_unicode
from megatron_glm.data.tokenizer_base import TokenizerBase, find_command_tokens
from megatron_glm.errors import DataError

__all__ = ["JsonTokenizer"]


class JsonTokenizer(TokenizerBase):
    """A ``tokenizers.Tokenizer`` (from a ``tokenizer.json`` or a tiktoken file) with GLM's interface.

    ``kind`` is ``"tokenizer.json"`` or ``"tiktoken"``; ``byte_level`` tells whether the vocabulary is
    byte-level (then :meth:`token_bytes` gives each token's raw bytes, which may split a UTF-8 character).
    """

    def __init__(self, model_path: str | os.PathLike[str], *, kind: str = "tokenizer.json") -> None:
        self.model_path = os.fspath(model_path)
        self.kind = kind
        if not os.path.isfile(self.model_path):
            raise DataError(f"{self.model_path}: tokenizer model not found")
        if kind == "tiktoken":
            tokenizer = build_tiktoken_tokenizer(self.model_path)
        else:
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(self.model_path)
            except Exception as exc:  # tokenizers raises plain Exceptions on bad JSON
                raise DataError(f"{self.model_path}: not a tokenizers tokenizer.json ({exc})") from None
        self._setup(tokenizer)

    def _setup(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        added = {token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()}
        found = find_command_tokens(added, self.model_path)
        spelled = {token_id: text for text, token_id in added.items()}
        self._set_command_tokens(found, {stem: spelled[token_id] for stem, token_id in found.items()})
        self._added = spelled
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(spelled, default=-1) + 1)
        self.base_vocab_size = tokenizer.get_vocab_size(with_added_tokens=False)
        self._byte_of = {char: byte for byte, char in byte_to_unicode().items()}
        self.byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"

    def _payload(self) -> tuple[str, str]:
        return self.kind, self._tok.to_str()

    def _load(self, payload: tuple[str, str]) -> None:
        from tokenizers import Tokenizer

        self.kind = payload[0]
        self._setup(Tokenizer.from_str(payload[1]))

    # -- encoding ------------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        self._tok.encode_special_tokens = not allow_special
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_plain(self, text: str) -> list[int]:
        return self.encode(text, allow_special=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        self._tok.encode_special_tokens = True
        return [encoding.ids for encoding in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not a token of {self.model_path}")
        return piece

    def _base_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.id_to_token(token_id)
        if self.byte_level and all(char in self._byte_of for char in piece):
            return bytes(self._byte_of[char] for char in piece)
        return self._tok.decode([token_id]).encode("utf-8")
