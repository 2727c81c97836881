"""The sidecar ``{prefix}.meta.json`` of a preprocessed dataset: token bound and fingerprint.

The ``.bin/.idx`` pair stays byte-for-byte Megatron's format; what Megatron's index has no room for is
recorded next to it by :mod:`megatron_glm.data.preprocess`:

- ``vocab_size`` / ``max_token_id``: the tokenizer the dataset was made with and its largest token id, checked
  against the training tokenizer when the dataset is opened (a dataset made with another tokenizer is refused
  before any step);
- ``tokenizer_fingerprint``: the tokenizer's :func:`~megatron_glm.data.tokenizer_fingerprint.tokenizer_fingerprint`;
  training refuses the dataset under a tokenizer with another fingerprint (same size, other pieces included),
  and warns that a dataset without it (Megatron-made, or older) cannot be verified beyond the id bound;
- ``fingerprint``: sha256 of the ``.idx`` file plus the ``.bin`` size, recorded in checkpoints so that
  resuming on a changed dataset is detected (:func:`dataset_fingerprint` computes it for any dataset,
  Megatron-made ones without a sidecar included).

The sidecar is trusted only while the files have the sizes it records.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from megatron_glm.data.indexed_dataset import bin_path, idx_path
from megatron_glm.errors import DataError
from megatron_glm.fileio import hash_file

__all__ = [
    "META_SUFFIX",
    "check_dataset_tokenizer",
    "dataset_fingerprint",
    "meta_path",
    "read_dataset_meta",
    "write_dataset_meta",
]

META_SUFFIX = ".meta.json"
_FORMAT = "megatron_glm.dataset_meta"


def meta_path(prefix: str | os.PathLike[str]) -> str:
    return os.fspath(prefix) + META_SUFFIX


def _fingerprint_files(idx: str, bin_size: int) -> str:
    h = hash_file(hashlib.sha256(), idx)
    h.update(str(bin_size).encode())
    return h.hexdigest()


def write_dataset_meta(
    prefix: str | os.PathLike[str], *, vocab_size: int, max_token_id: int, tokenizer_fingerprint: str = ""
) -> str:
    """Write the sidecar of the finished dataset ``prefix`` (atomically)."""
    bin_size = os.path.getsize(bin_path(prefix))
    record = {
        "format": _FORMAT,
        "version": 1,
        "vocab_size": int(vocab_size),
        "max_token_id": int(max_token_id),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "bin_bytes": bin_size,
        "idx_bytes": os.path.getsize(idx_path(prefix)),
        "fingerprint": _fingerprint_files(idx_path(prefix), bin_size),
    }
    path = meta_path(prefix)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(record, out, indent=1)
    os.replace(tmp, path)
    return path


def read_dataset_meta(prefix: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of ``prefix``, or ``None`` when there is none; :class:`DataError` when it is unreadable or
    does not belong to the files next to it."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as stream:
            record = json.load(stream)
        if record.get("format") != _FORMAT:
            raise ValueError("not a dataset sidecar")
        sizes = int(record["bin_bytes"]), int(record["idx_bytes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: unreadable dataset metadata ({exc}); delete it or preprocess again") from None
    actual = os.path.getsize(bin_path(prefix)), os.path.getsize(idx_path(prefix))
    if sizes != actual:
        raise DataError(
            f"{path}: records .bin/.idx sizes {sizes[0]}/{sizes[1]} but the files have "
            f"{actual[0]}/{actual[1]} bytes; they do not belong together (preprocess again)"
        )
    return record


def dataset_fingerprint(prefix: str | os.PathLike[str]) -> str:
    """sha256 of the ``.idx`` plus the ``.bin`` size (from the sidecar when there is one)."""
    record = read_dataset_meta(prefix)
    if record is not None and record.get("fingerprint"):
        return str(record["fingerprint"])
    return _fingerprint_files(idx_path(prefix), os.path.getsize(bin_path(prefix)))


def check_dataset_tokenizer(prefix: str | os.PathLike[str], fingerprint: str, tokenizer_path: str = "") -> str | None:
    """Refuse (:class:`DataError`) the dataset ``prefix`` when its sidecar records another tokenizer fingerprint
    than ``fingerprint`` (the training tokenizer's); returns a warning when the dataset cannot be verified (no
    sidecar, or one written before fingerprints were recorded), else None."""
    record = read_dataset_meta(prefix)
    recorded = str(record.get("tokenizer_fingerprint") or "") if record is not None else ""
    if not recorded:
        why = "has no sidecar (.meta.json)" if record is None else "records no tokenizer fingerprint"
        return (
            f"warning: {prefix} {why}: the tokenizer it was made with cannot be verified (only that its ids fit); "
            f"preprocess it with tools/preprocess_data.py to record it"
        )
    if recorded != fingerprint:
        named = f" ({tokenizer_path})" if tokenizer_path else ""
        raise DataError(
            f"{prefix}: made with the tokenizer of fingerprint {recorded[:12]}, but this run's tokenizer{named} "
            f"is {fingerprint[:12]}; train with the tokenizer it was made with, or preprocess it again"
        )
    return None
