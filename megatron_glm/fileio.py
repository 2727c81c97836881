"""File digests shared by checkpoints, datasets and run identities."""

from __future__ import annotations

import hashlib
import os

BLOCK = 1 << 22


def hash_file(h: hashlib._Hash, path: str | os.PathLike[str]) -> hashlib._Hash:
    """Feed the bytes of ``path`` into ``h`` (4 MiB at a time); returns ``h``."""
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(BLOCK), b""):
            h.update(block)
    return h


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's bytes."""
    return hash_file(hashlib.sha256(), path).hexdigest()
