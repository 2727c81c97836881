"""What every GLM tokenizer offers, whatever its library: GLM's command tokens and one interface.

Callers (preprocessing, the objectives, generation, fine-tuning, evaluation, checkpoint conversion) see
:class:`TokenizerBase`: ``encode`` (command tokens written in the text map to their ids), ``encode_batch``
(corpus text, command tokens stay text), ``decode``, ``id_to_token``, ``token_to_id``, ``token_bytes``,
``vocab_size``, ``padded_vocab_size``, the command-token ids as attributes (``mask_id``, ``gmask_id``,
``sop_id``, ...) and pickling (DataLoader and preprocessing workers). Open one with
:func:`megatron_glm.data.tokenizer.open_tokenizer`.

Command tokens: :data:`COMMAND_TOKENS` lists each one's attribute stem and its accepted spellings, ours first
(``[sop]``) then GLM-4's (``<sop>``). A tokenizer that brings its own vocabulary (``tokenizer.json``, tiktoken)
must hold the :data:`REQUIRED` ones among its special tokens (else a one-line :class:`DataError` naming the
token and the file); ``[pad]`` falls back to end of text (GLM-4 pads with ``<|endoftext|>``); the others
(``[CLS]``, ``[dBLOCK]``, ``[UNK]``, ``[SEP]``) are optional: reading ``cls_id`` of a tokenizer without
``[CLS]`` raises :class:`MissingTokenError` (a :class:`DataError`) naming it, so only what needs one fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from megatron_glm.errors import DataError

__all__ = ["COMMAND_TOKENS", "OPTIONAL", "REQUIRED", "MissingTokenError", "TokenizerBase"]

#: (attribute stem, text) of each command token, in the id order of a sentencepiece tokenizer.
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

#: Accepted spellings of each command token in a tokenizer's own special tokens (first match wins).
SPELLINGS: dict[str, tuple[str, ...]] = {
    "pad": ("[pad]", "<pad>", "[PAD]"),
    "eos": ("[eos]", "<|endoftext|>", "</s>", "<eos>"),
    "cls": ("[CLS]",),
    "mask": ("[MASK]",),
    "smask": ("[sMASK]",),
    "gmask": ("[gMASK]",),
    "sop": ("[sop]", "<sop>"),
    "eop": ("[eop]", "<eop>"),
    "dblock": ("[dBLOCK]",),
    "unk": ("[UNK]", "<unk>"),
    "sep": ("[SEP]",),
}

#: Command tokens a tokenizer must hold: every objective and generation uses them.
REQUIRED: tuple[str, ...] = ("eos", "mask", "smask", "gmask", "sop", "eop")
#: Looked up, but only an error where something uses them (``[pad]`` falls back to end of text).
OPTIONAL: tuple[str, ...] = ("pad", "cls", "dblock", "unk", "sep")

_USES = {
    "cls": "the blank-infilling samples and GLM prompts start with it",
    "dblock": "block_mask_prob / context_mask_ratio write it",
    "unk": "nothing in this project uses it",
    "sep": "nothing in this project uses it",
}
_TEXT = dict(COMMAND_TOKENS)


class MissingTokenError(DataError, AttributeError):
    """An optional command token the tokenizer lacks was asked for (also an ``AttributeError``, so that
    ``getattr(tokenizer, "dblock_id", default)`` still gives the default)."""


def find_command_tokens(special: dict[str, int], source: str) -> dict[str, int]:
    """Stem -> id of the command tokens among ``special`` (text -> id); a missing required one is an error."""
    found: dict[str, int] = {}
    for stem, _ in COMMAND_TOKENS:
        token_id = next((special[s] for s in SPELLINGS[stem] if s in special), None)
        if token_id is not None:
            found[stem] = token_id
        elif stem in REQUIRED:
            raise DataError(
                f"{source}: no GLM command token {' / '.join(SPELLINGS[stem])} among the tokenizer's special tokens "
                "(GLM needs end of text, [MASK], [sMASK], [gMASK], sop and eop)"
            )
    found.setdefault("pad", found["eos"])
    return found


class TokenizerBase:
    """The interface shared by the sentencepiece and ``tokenizers`` backed GLM tokenizers.

    A subclass sets ``model_path``, ``vocab_size``, ``kind`` and calls :meth:`_set_command_tokens`; it
    implements ``_encode_plain``, ``_decode_ids``, ``_piece``, ``_base_id`` and ``token_bytes``, and pickles
    through ``_payload`` / ``_load``.
    """

    model_path: str
    vocab_size: int
    kind: str = ""
    command_tokens: dict[str, int]
    """Stem (``"mask"``) -> id of the command tokens this tokenizer has."""

    def _set_command_tokens(self, found: dict[str, int], texts: dict[str, str]) -> None:
        """``found``: stem -> id; ``texts``: stem -> the spelling the tokenizer uses."""
        self.command_tokens = dict(found)
        for stem, token_id in found.items():
            setattr(self, f"{stem}_id", token_id)
        self._command_text = {token_id: texts[stem] for stem, token_id in found.items()}
        self._command_id = {texts[stem]: token_id for stem, token_id in found.items()}
        self._canonical = {_TEXT[stem]: token_id for stem, token_id in found.items()}

    def __getattr__(self, name: str) -> Any:
        stem = name[:-3] if name.endswith("_id") else None
        if stem in _USES and "command_tokens" in self.__dict__:
            raise MissingTokenError(
                f"{self.__dict__.get('model_path', '?')}: the tokenizer has no {' / '.join(SPELLINGS[stem])} token "
                f"({_USES[stem]}); add it to the tokenizer's special tokens"
            )
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def command_token_ids(self) -> dict[str, int]:
        """``{"[pad]": id, "[eos]": id, ...}``: GLM's spelling of each command token this tokenizer has."""
        return dict(self._canonical)

    # -- encoding ------------------------------------------------------------------------------------

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, command tokens written in them staying text (what preprocessing stores)."""
        return [self._encode_plain(text) for text in texts]

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        With ``allow_special`` (the default) the tokenizer's special tokens written in the text map to their
        ids; without it they are tokenized as ordinary text (what preprocessing does with a corpus).
        """
        raise NotImplementedError

    def decode(self, ids: Iterable[int] | Any) -> str:
        """Text of ``ids`` (a list, numpy array or tensor); command tokens are written as their text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        return self._decode_ids(ids)

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        """The piece (or command token text) of ``token_id``."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return self._command_text.get(token_id) or self._piece(token_id)

    def _piece(self, token_id: int) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int:
        """The id of a command token (our spelling ``"[sop]"`` or the tokenizer's own) or of a piece."""
        if token in self._canonical:
            return self._canonical[token]
        if token in self._command_id:
            return self._command_id[token]
        token_id = self._base_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not a token of {self.model_path}")
        return token_id

    def _base_id(self, token: str) -> int | None:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` stands for in the text (UTF-8 of a command token's text)."""
        raise NotImplementedError

    # -- sizes ---------------------------------------------------------------------------------------

    def padded_vocab_size(self, tp_size: int = 1, divisible_by: int = 128) -> int:
        """``vocab_size`` rounded up to a multiple of ``divisible_by * tp_size`` (Megatron's rule)."""
        if tp_size < 1 or divisible_by < 1:
            raise ValueError(f"tp_size ({tp_size}) and divisible_by ({divisible_by}) must be positive")
        multiple = divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple

    def __len__(self) -> int:
        return self.vocab_size

    # -- pickling (for DataLoader and preprocessing workers) ------------------------------------------

    def _payload(self) -> Any:
        raise NotImplementedError

    def _load(self, payload: Any) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "payload": self._payload()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.model_path = state["model_path"]
        self._load(state["payload"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_path!r}, vocab_size={self.vocab_size})"
