"""GLM tokenizers: opening one (:func:`open_tokenizer`, the one factory) and the sentencepiece kind.

``--tokenizer-model`` names any of:

- a sentencepiece model (:class:`GLMTokenizer`): GLM's command tokens (``[pad]``, ``[eos]``, ``[CLS]``,
  ``[MASK]``, ``[sMASK]``, ``[gMASK]``, ``[sop]``, ``[eop]``, ``[dBLOCK]``, ``[UNK]``, ``[SEP]``) take the ids
  ``base_size, base_size + 1, ...`` in that order, so every id is unique (the original Chinese 10B tokenizer
  gave ``[gMASK]`` and ``[eop]`` the same id; here uniqueness is checked on construction);
- a ``tokenizer.json`` or a folder holding one, or a tiktoken BPE file (GLM-4-9B's ``tokenizer.model``), read
  with the ``tokenizers`` library (:class:`~megatron_glm.data.tokenizer_json.JsonTokenizer`): the command
  tokens are the tokenizer's own special tokens (see :mod:`megatron_glm.data.tokenizer_base`).

:meth:`GLMTokenizer.encode` maps command tokens written in the text (``"The capital is [MASK]."``)
to their ids; :meth:`GLMTokenizer.decode` writes them back as text, so ``decode(encode(text)) ==
text`` for a model trained with the identity normalisation and byte fallback (as
``tools/train_tokenizer.py`` trains them).
"""

from __future__ import annotations

import hashlib
import os
import re

import sentencepiece as spm

from megatron_glm.data.tokenizer_base import COMMAND_TOKENS, MissingTokenError, TokenizerBase
from megatron_glm.errors import DataError
from megatron_glm.fileio import file_sha256

__all__ = [
    "COMMAND_TOKENS",
    "GLMTokenizer",
    "MissingTokenError",
    "TokenizerBase",
    "open_tokenizer",
    "tokenizer_fingerprint",
    "tokenizer_kind",
]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class GLMTokenizer(TokenizerBase):
    """A sentencepiece model with GLM's command tokens appended.

    Attributes ``pad_id, eos_id, cls_id, mask_id, smask_id, gmask_id, sop_id, eop_id, dblock_id,
    unk_id, sep_id`` are the command token ids; ``command_tokens`` maps the same stems (``"mask"``)
    to ids. ``vocab_size`` counts the base pieces and the command tokens (unpadded); the embedding
    size is :meth:`padded_vocab_size`.
    """

    kind = "sentencepiece"

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
        found = {stem: self.base_vocab_size + offset for offset, (stem, _) in enumerate(COMMAND_TOKENS)}
        ids = list(found.values())
        if len(set(ids)) != len(ids) or min(ids) < self.base_vocab_size:
            raise DataError(f"{self.model_path}: command token ids {ids} are not unique after the base vocab")
        self._set_command_tokens(found, dict(COMMAND_TOKENS))
        self.vocab_size = self.base_vocab_size + len(COMMAND_TOKENS)
        # Longest first so that no token text shadows a longer one that starts the same way.
        texts = sorted(self._command_id, key=len, reverse=True)
        self._special = re.compile("(" + "|".join(re.escape(t) for t in texts) + ")")

    def _payload(self) -> bytes:
        return self._proto

    # -- encoding ------------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        if not allow_special or "[" not in text:
            return self._encode_plain(text)
        ids: list[int] = []
        for i, part in enumerate(self._special.split(text)):
            if i % 2:
                ids.append(self._command_id[part])
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

    def _decode_ids(self, ids: list[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            if token < self.base_vocab_size:
                run.append(token)
                continue
            if run:
                parts.append(self._sp.DecodeIds(run))
                run = []
            parts.append(self._command_text[token])
        if run:
            parts.append(self._sp.DecodeIds(run))
        return "".join(parts)

    def _piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(token_id)

    def _base_id(self, token: str) -> int | None:
        token_id = self._sp.PieceToId(token)
        if token_id == self._sp.unk_id() and self._sp.IdToPiece(token_id) != token:
            return None
        return token_id

    def token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        if token_id in self._command_text:
            return self._command_text[token_id].encode("utf-8")
        piece = self.id_to_token(token_id)
        if self._sp.IsByte(token_id):
            return bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)])  # type: ignore[union-attr]
        if self._sp.IsControl(token_id) or self._sp.IsUnknown(token_id):
            return b""
        return piece.replace("\u2581", " ").encode("utf-8")


# -- opening ---------------------------------------------------------------------------------------------

#: The file a tokenizer folder must hold (``tokenizer.json``; else a tiktoken ``tokenizer.model``).
TOKENIZER_JSON = "tokenizer.json"
TIKTOKEN_MODEL = "tokenizer.model"


def _resolve(path: str) -> tuple[str, str]:
    """(kind, file) of ``path``: ``sentencepiece``, ``tokenizer.json`` or ``tiktoken``."""
    from megatron_glm.data.tiktoken_file import looks_like_tiktoken

    if os.path.isdir(path):
        for name in (TOKENIZER_JSON, TIKTOKEN_MODEL):
            inner = os.path.join(path, name)
            if os.path.isfile(inner):
                return _resolve(inner)
        raise DataError(f"{path}: a tokenizer folder must hold {TOKENIZER_JSON} (or a tiktoken {TIKTOKEN_MODEL})")
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer model not found")
    if path.endswith(".json"):
        return "tokenizer.json", path
    return ("tiktoken" if looks_like_tiktoken(path) else "sentencepiece"), path


def tokenizer_kind(path: str | os.PathLike[str]) -> str:
    """``sentencepiece``, ``tokenizer.json`` or ``tiktoken``: what ``--tokenizer-model`` names."""
    return _resolve(os.fspath(path))[0]


def open_tokenizer(path: str | os.PathLike[str]) -> TokenizerBase:
    """The GLM tokenizer ``--tokenizer-model`` names: a sentencepiece model, a ``tokenizer.json`` (or a folder
    holding one) or a tiktoken BPE file. Bad input is a one-line :class:`DataError`."""
    path = os.fspath(path)
    if not path:
        raise DataError("--tokenizer-model is required")
    kind, file = _resolve(path)
    if kind == "sentencepiece":
        return GLMTokenizer(file)
    from megatron_glm.data.tokenizer_json import JsonTokenizer

    return JsonTokenizer(file, kind=kind)


def tokenizer_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of the file the tokenizer is read from (a folder's ``tokenizer.json`` or tiktoken file), plus,
    for a tiktoken file, of the ``tokenizer_config.json`` next to it that names its special tokens."""
    kind, file = _resolve(os.fspath(path))
    config = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    try:
        digest = file_sha256(file)
        if kind == "tiktoken" and os.path.isfile(config):
            digest = hashlib.sha256(f"{digest}:{file_sha256(config)}".encode()).hexdigest()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the tokenizer ({exc.strerror or exc})") from None
    return digest
