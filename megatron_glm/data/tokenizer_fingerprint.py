"""The one fingerprint of a tokenizer, recorded by datasets (their sidecar), checkpoints and preprocessing plans.

Two tokenizers with the same number of pieces but other pieces give the same id bound and different text, so
what is compared is this fingerprint: today the sha256 of the model file (a tokenizer kept as a folder of files
is to be fingerprinted here too, so every record stays comparable).
"""

from __future__ import annotations

import os

from megatron_glm.errors import DataError
from megatron_glm.fileio import file_sha256

__all__ = ["tokenizer_fingerprint"]


def tokenizer_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) identifying the tokenizer at ``path`` (a sentencepiece ``.model`` file); :class:`DataError`
    when it cannot be read."""
    try:
        return file_sha256(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the tokenizer ({exc.strerror or exc})") from None
