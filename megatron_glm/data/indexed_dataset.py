"""Megatron-compatible memory-mapped indexed dataset (``.bin`` / ``.idx``).

The format (little-endian, no padding) is byte-for-byte the one written and read by
``megatron.core.datasets.indexed_dataset``:

``.bin``: the raw concatenation of every sequence's tokens, no header.

``.idx``::

    offset 0   9 bytes  b"MMIDIDX\\x00\\x00"
    offset 9   <Q       version = 1
    offset 17  <B       dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)
    offset 18  <Q       sequence count N
    offset 26  <Q       document count D (= number of documents + 1)
    offset 34  int32[N] sequence lengths (tokens)
               int64[N] sequence pointers (byte offsets into .bin)
               int64[D] document indices: 0, then the sequence index where each document ends

A document made of sentences is stored as one sequence per sentence; a document without sentence
splitting is one sequence. :class:`IndexedDataset` reads with zero-copy numpy views of a memory map
and checks the header, sizes, pointers and file lengths on open, so a corrupt, truncated or
mismatched pair of files fails with one clear :class:`~megatron_glm.errors.DataError`. The writer is
:class:`~megatron_glm.data.indexed_builder.IndexedDatasetBuilder`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from typing import Any

import numpy as np

from megatron_glm.errors import DataError

__all__ = [
    "DTYPE_CODES",
    "INDEX_HEADER",
    "IndexedDataset",
    "best_dtype",
    "bin_path",
    "idx_path",
]

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count

#: Megatron dtype codes. Codes 6 (float64) and 7 (float32) were swapped in older forks and are no token
#: types, so they are neither written nor read.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}


def bin_path(prefix: str | os.PathLike[str]) -> str:
    """The data file of a dataset prefix: ``{prefix}.bin``."""
    return os.fspath(prefix) + ".bin"


def idx_path(prefix: str | os.PathLike[str]) -> str:
    """The index file of a dataset prefix: ``{prefix}.idx``."""
    return os.fspath(prefix) + ".idx"


def best_dtype(vocab_size: int | None) -> np.dtype:
    """The smallest safe token dtype for ``vocab_size`` token ids (Megatron's rule).

    ``uint16`` when the vocabulary has fewer than 65,500 ids, else ``int32``.
    """
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


class IndexedDataset:
    """Read-only view of a ``{prefix}.bin`` / ``{prefix}.idx`` pair through memory maps.

    ``ds[i]`` is a zero-copy numpy view of sequence ``i`` (read-only); ``ds.get(i, offset, length)``
    reads part of a sequence. ``sequence_lengths`` (int32), ``sequence_pointers`` (int64, byte
    offsets) and ``document_indices`` (int64, from 0 to ``len(ds)``) are views of the index.

    The header, the file sizes and (with ``verify=True``, the default) every pointer are checked on
    open. Instances pickle by prefix, so they can be handed to ``DataLoader`` workers.
    """

    def __init__(self, prefix: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.prefix = os.fspath(prefix)
        self._verify = verify
        self._idx_map: mmap.mmap | None = None
        self._bin_map: mmap.mmap | None = None
        self._open()

    # -- opening and validation ---------------------------------------------------------------------

    def _open(self) -> None:
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise DataError(f"{path}: indexed dataset file not found")
        idx_size = os.path.getsize(ipath)
        if idx_size < _HEADER_SIZE:
            raise DataError(f"{ipath}: truncated index: {idx_size} bytes, expected at least {_HEADER_SIZE}")
        with open(ipath, "rb") as stream:
            header = stream.read(_HEADER_SIZE)
            idx_buffer: Any = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        self._idx_map = idx_buffer
        if header[:9] != INDEX_HEADER:
            raise DataError(f"{ipath}: not a Megatron index file (magic {header[:9]!r}, expected {INDEX_HEADER!r})")
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != INDEX_VERSION:
            raise DataError(f"{ipath}: index version {version}, expected {INDEX_VERSION}")
        code = header[17]
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath}: dtype code {code} is not a token dtype; expected one of {sorted(DTYPE_CODES)}")
        self._dtype = DTYPE_CODES[code]
        n, d = struct.unpack_from("<QQ", header, 18)
        expected = _HEADER_SIZE + 12 * n + 8 * d
        # The multimodal variant appends int8[N] modes, not recorded in the header; they are ignored.
        if idx_size not in (expected, expected + n):
            raise DataError(
                f"{ipath}: index is {idx_size} bytes but its header ({n} sequences, {d} document entries) "
                f"needs {expected}; the file is truncated or corrupt"
            )
        if d < 1:
            raise DataError(f"{ipath}: document index is empty; expected at least the leading 0")
        self._lengths = np.frombuffer(idx_buffer, dtype="<i4", count=n, offset=_HEADER_SIZE)
        self._pointers = np.frombuffer(idx_buffer, dtype="<i8", count=n, offset=_HEADER_SIZE + 4 * n)
        self._documents = np.frombuffer(idx_buffer, dtype="<i8", count=d, offset=_HEADER_SIZE + 12 * n)
        if self._documents[0] != 0 or self._documents[-1] != n:
            raise DataError(
                f"{ipath}: document indices run from {self._documents[0]} to {self._documents[-1]}; "
                f"expected 0 to the sequence count {n}"
            )
        itemsize = self._dtype.itemsize
        bin_size = os.path.getsize(bpath)
        data_size = 0 if n == 0 else int(self._pointers[-1]) + int(self._lengths[-1]) * itemsize
        if bin_size != data_size:
            raise DataError(
                f"{bpath}: data file is {bin_size} bytes but {ipath} points to {data_size} bytes "
                f"of {self._dtype} tokens; the files are truncated or do not belong together"
            )
        if self._verify:
            self._check_index(ipath)
        if bin_size:
            with open(bpath, "rb") as stream:
                self._bin_map = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
            self._bin: Any = self._bin_map
        else:
            self._bin = b""

    def _check_index(self, ipath: str) -> None:
        itemsize = self._dtype.itemsize
        n = len(self._lengths)
        block = 1 << 22
        start_pointer = 0
        for lo in range(0, n, block):
            lengths = self._lengths[lo : lo + block]
            pointers = self._pointers[lo : lo + block]
            if lengths.min() < 0:
                bad = lo + int(np.argmax(lengths < 0))
                raise DataError(f"{ipath}: sequence {bad} has negative length {self._lengths[bad]}")
            expected = np.empty(len(lengths), dtype=np.int64)
            expected[0] = start_pointer
            np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
            expected[1:] += start_pointer
            if not np.array_equal(expected, pointers):
                bad = lo + int(np.argmax(expected != pointers))
                raise DataError(
                    f"{ipath}: sequence {bad} points to byte {self._pointers[bad]}, expected "
                    f"{expected[bad - lo]} from the lengths before it; the index is corrupt"
                )
            start_pointer = int(expected[-1]) + int(lengths[-1]) * itemsize
        if len(self._documents) > 1 and np.any(np.diff(self._documents) < 0):
            bad = int(np.argmax(np.diff(self._documents) < 0)) + 1
            raise DataError(f"{ipath}: document index {bad} goes backwards; the index is corrupt")

    # -- access --------------------------------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype:
        """Token dtype of the ``.bin`` file."""
        return self._dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """Tokens per sequence, int32, one entry per sequence."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """Byte offset of each sequence in the ``.bin`` file, int64."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 array: 0, then the sequence index at which each document ends (last == ``len(self)``)."""
        return self._documents

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self._documents) - 1

    @property
    def num_tokens(self) -> int:
        """Total number of tokens in the ``.bin`` file."""
        return int(self._lengths.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self._lengths)

    def _index(self, idx: int) -> int:
        n = len(self._lengths)
        if not isinstance(idx, int | np.integer):
            raise TypeError(f"sequence index must be an int, not {type(idx).__name__}")
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences")
        return i

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        i = self._index(idx)
        return np.frombuffer(self._bin, dtype=self._dtype, count=int(self._lengths[i]), offset=int(self._pointers[i]))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``idx`` (to its end when ``length`` is None)."""
        i = self._index(idx)
        size = int(self._lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {i} of length {size}")
        return np.frombuffer(
            self._bin,
            dtype=self._dtype,
            count=length,
            offset=int(self._pointers[i]) + offset * self._dtype.itemsize,
        )

    def document(self, doc: int) -> list[np.ndarray]:
        """The sequences (sentences) of document ``doc``."""
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"document index {doc} out of range for {self.num_documents} documents")
        return [self[i] for i in range(int(self._documents[doc]), int(self._documents[doc + 1]))]

    @staticmethod
    def exists(prefix: str | os.PathLike[str]) -> bool:
        """Whether both files of ``prefix`` exist."""
        return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the views and close the memory maps (views handed out earlier keep them alive)."""
        for name in ("_lengths", "_pointers", "_documents"):
            self.__dict__.pop(name, None)
        self._bin = b""
        for mapping in (self._idx_map, self._bin_map):
            if mapping is not None:
                # BufferError: an exported view is still alive; the map closes with it.
                with contextlib.suppress(BufferError):
                    mapping.close()
        self._idx_map = self._bin_map = None

    def __enter__(self) -> IndexedDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "verify": self._verify}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["prefix"], verify=False)  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
            f"dtype={self._dtype})"
        )
