"""GLM tokenizer for ``transformers`` (remote code shipped with a megatron_glm export).

A sentencepiece model (``tokenizer.model``) with GLM's command tokens appended after its pieces, in this order
and with these ids: ``[pad]`` = pieces, ``[eos]``, ``[CLS]``, ``[MASK]``, ``[sMASK]``, ``[gMASK]``, ``[sop]``,
``[eop]``, ``[dBLOCK]``, ``[UNK]``, ``[SEP]`` (the ids megatron_glm trained with). Command tokens written in
the text map to their ids; the text between them is encoded piece by piece by sentencepiece. With special
tokens, a sequence starts with ``[CLS]``.

Self-contained: imports ``transformers`` and ``sentencepiece`` only (never ``megatron_glm``).
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import sentencepiece as spm
import torch
from transformers import PreTrainedTokenizer

COMMAND_TOKENS = (
    "[pad]",
    "[eos]",
    "[CLS]",
    "[MASK]",
    "[sMASK]",
    "[gMASK]",
    "[sop]",
    "[eop]",
    "[dBLOCK]",
    "[UNK]",
    "[SEP]",
)
BLANKS = ("[MASK]", "[sMASK]", "[gMASK]")
_BLANK_RE = re.compile(r"(\[MASK\]|\[sMASK\]|\[gMASK\])")


class GLMTokenizer(PreTrainedTokenizer):
    """Sentencepiece pieces plus GLM's command tokens (see the module docstring)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}  # noqa: RUF012 (read by transformers)
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(
        self,
        vocab_file: str,
        pad_token: str = "[pad]",
        eos_token: str = "[eos]",
        cls_token: str = "[CLS]",
        mask_token: str = "[MASK]",
        sep_token: str = "[SEP]",
        unk_token: str = "[UNK]",
        **kwargs: Any,
    ) -> None:
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(vocab_file)
        base = self.sp_model.GetPieceSize()
        self.command_ids = {text: base + i for i, text in enumerate(COMMAND_TOKENS)}
        self._command_text = {i: t for t, i in self.command_ids.items()}
        self._split_re = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(COMMAND_TOKENS, key=len, reverse=True)) + ")"
        )
        super().__init__(
            pad_token=pad_token,
            eos_token=eos_token,
            cls_token=cls_token,
            mask_token=mask_token,
            sep_token=sep_token,
            unk_token=unk_token,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.sp_model.GetPieceSize() + len(COMMAND_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.IdToPiece(i): i for i in range(self.sp_model.GetPieceSize())}
        vocab.update(self.command_ids)
        return vocab

    def __len__(self) -> int:
        return self.vocab_size

    def token_id(self, text: str) -> int:
        """The id of a command token (``"[sop]"``)."""
        return self.command_ids[text]

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Pieces of ``text``; command tokens written in it stay whole."""
        out: list[str] = []
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2:
                out.append(part)
            elif part:
                out.extend(self.sp_model.EncodeAsPieces(part))
        return out

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.EncodeAsPieces(text)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.command_ids:
            return self.command_ids[token]
        return self.sp_model.PieceToId(token)

    def _convert_token_to_id_with_added_voc(self, token: str) -> int:
        return self._convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._command_text:
            return self._command_text[index]
        return self.sp_model.IdToPiece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode([self._convert_token_to_id(t) for t in tokens])

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        parts: list[str] = []
        run: list[int] = []
        for token in token_ids:
            token = int(token)
            text = self._command_text.get(token)
            if text is None:
                run.append(token)
                continue
            if run:
                parts.append(self.sp_model.DecodeIds(run))
                run = []
            if not skip_special_tokens:
                parts.append(text)
        if run:
            parts.append(self.sp_model.DecodeIds(run))
        return "".join(parts)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """``[CLS]`` + the ids (+ the second sequence's)."""
        return [self.command_ids["[CLS]"], *token_ids_0, *(token_ids_1 or [])]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 1

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return [1 if t in self._command_text else 0 for t in token_ids_0 + (token_ids_1 or [])]
        return [1] + [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def encode_prompt(self, text: str) -> list[int]:
        """Part A of a prompt: ``[CLS]`` + its ids, spaces right before a blank dropped (a masked span carries
        its own leading space in training), ``[gMASK]`` appended when the text has no blank."""
        ids = [self.command_ids["[CLS]"]]
        parts = _BLANK_RE.split(text)
        for i, part in enumerate(parts):
            if not i % 2 and i + 1 < len(parts):
                part = part.rstrip(" ")
            if part:
                ids.extend(self.convert_tokens_to_ids(self.tokenize(part)))
        if not any(self.command_ids[b] in ids for b in BLANKS):
            ids.append(self.command_ids["[gMASK]"])
        return ids

    def build_inputs_for_generation(self, texts: str | list[str], return_tensors: str = "pt") -> dict[str, Any]:
        """``input_ids`` and a 0/1 ``attention_mask`` for ``model.generate``: each row is Part A
        (:meth:`encode_prompt`), ``[pad]`` up to the longest Part A, then ``[sop]``."""
        if return_tensors != "pt":
            raise ValueError("build_inputs_for_generation returns torch tensors (return_tensors='pt')")
        rows = [self.encode_prompt(t) for t in ([texts] if isinstance(texts, str) else texts)]
        width = max(len(r) for r in rows)
        pad, sop = self.command_ids["[pad]"], self.command_ids["[sop]"]
        ids = torch.tensor([[*r, *[pad] * (width - len(r)), sop] for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) + [1] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
