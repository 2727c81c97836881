"""Writing a Megatron ``.bin`` / ``.idx`` pair (the format is described in :mod:`.indexed_dataset`).

:class:`IndexedDatasetBuilder` writes atomically (temporary names, ``os.replace`` on
:meth:`~IndexedDatasetBuilder.finalize`) and keeps its memory bounded however many sequences it is
given (the index arrays are spilled to temporary files).
"""

from __future__ import annotations

import array
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from megatron_glm.data.indexed_dataset import (
    DTYPE_CODES,
    INDEX_HEADER,
    INDEX_VERSION,
    IndexedDataset,
    bin_path,
    idx_path,
)
from megatron_glm.errors import DataError

__all__ = ["IndexedDatasetBuilder"]

_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Index entries kept in memory by the builder before they are appended to a temporary file.
_SPILL_ENTRIES = 1 << 16
_COPY_BUFFER = 16 << 20


def _token_dtype(dtype: Any) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise DataError(f"dtype {dtype!r} is not a numpy dtype") from exc
    if resolved.newbyteorder("=") not in _CODE_OF:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise DataError(f"dtype {resolved} cannot be stored in an indexed dataset; expected one of {names}")
    return resolved.newbyteorder("=")


_idx_path_of = idx_path


class _Spilled:
    """An append-only integer array kept in memory up to a bound, then appended to a temporary file."""

    def __init__(self, typecode: str, path: str) -> None:
        self.typecode = typecode
        self.path = path
        self.buffer = array.array(typecode)
        self.spilled = 0
        self._file: Any = None

    def __len__(self) -> int:
        return self.spilled + len(self.buffer)

    def append(self, value: int) -> None:
        self.buffer.append(value)
        if len(self.buffer) >= _SPILL_ENTRIES:
            self.flush()

    def extend(self, values: np.ndarray) -> None:
        for lo in range(0, len(values), _SPILL_ENTRIES):
            self.buffer.frombytes(np.ascontiguousarray(values[lo : lo + _SPILL_ENTRIES]).tobytes())
            if len(self.buffer) >= _SPILL_ENTRIES:
                self.flush()

    def last(self) -> int:
        if self.buffer:
            return self.buffer[-1]
        self.flush()
        with open(self.path, "rb") as stream:
            stream.seek(-self.buffer.itemsize, os.SEEK_END)
            return array.array(self.typecode, stream.read()).pop()

    def flush(self) -> None:
        if not self.buffer:
            return
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self.buffer.tofile(self._file)
        self._file.flush()
        self.spilled += len(self.buffer)
        self.buffer = array.array(self.typecode)

    def blocks(self) -> Iterable[np.ndarray]:
        """All values in order, as numpy blocks of bounded size."""
        dtype = np.dtype(self.typecode)
        if self._file is not None:
            self._file.flush()
            with open(self.path, "rb") as stream:
                while chunk := stream.read(_SPILL_ENTRIES * dtype.itemsize):
                    yield np.frombuffer(chunk, dtype=dtype)
        if self.buffer:
            yield np.frombuffer(self.buffer, dtype=dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self.path):
            os.remove(self.path)


class IndexedDatasetBuilder:
    """Writes a ``.bin`` / ``.idx`` pair; the API of Megatron's builder, atomic and memory-bounded.

    ``IndexedDatasetBuilder(path, dtype)`` takes a prefix or a ``.bin`` path. Tokens go to a
    temporary file next to it; :meth:`finalize` writes the index and moves both files to their final
    names, so an interrupted run leaves nothing half-written under them. As a context manager the
    builder finalizes on a clean exit and discards everything when the block raises.

    Example (documents ``[[5, 6, 7], [8, 9]]`` and ``[[1]]``)::

        with IndexedDatasetBuilder("out/corpus", best_dtype(vocab_size)) as builder:
            builder.add_document([5, 6, 7, 8, 9], lengths=[3, 2])
            builder.add_item([1])
            builder.end_document()
    """

    def __init__(self, bin_path_or_prefix: str | os.PathLike[str], dtype: Any = np.int32) -> None:
        path = os.fspath(bin_path_or_prefix)
        self.prefix = path[: -len(".bin")] if path.endswith(".bin") else path
        self.bin_path = bin_path(self.prefix)
        self.dtype = _token_dtype(dtype)
        directory = os.path.dirname(os.path.abspath(self.bin_path))
        if not os.path.isdir(directory):
            raise DataError(f"{self.bin_path}: output directory {directory} does not exist")
        tag = f".tmp{os.getpid()}"
        self._tmp_bin = self.bin_path + tag
        self._data: Any = open(self._tmp_bin, "wb")  # noqa: SIM115 - closed in finalize()/abort()
        self._lengths = _Spilled("i", self.bin_path + tag + ".lengths")
        self._documents = _Spilled("q", self.bin_path + tag + ".documents")
        self._documents.append(0)
        self._closed = False

    # -- adding data ---------------------------------------------------------------------------------

    def _as_tokens(self, tokens: Any) -> np.ndarray:
        if self._closed:
            raise RuntimeError(f"{self.bin_path}: builder is already finalized or aborted")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.dtype == self.dtype:
            return arr
        if arr.size and arr.dtype.kind in "iub":
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise DataError(
                    f"{self.bin_path}: token ids {lo}..{hi} do not fit dtype {self.dtype} "
                    f"({info.min}..{info.max}); choose a wider dtype"
                )
        elif arr.size and arr.dtype.kind != "i":
            raise DataError(f"{self.bin_path}: tokens must be integers, got dtype {arr.dtype}")
        return arr.astype(self.dtype)

    def add_item(self, tokens: Any) -> None:
        """Append one sequence (a sentence, or a whole document without sentence splitting)."""
        arr = self._as_tokens(tokens)
        self._data.write(arr.tobytes())
        self._lengths.append(len(arr))

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last one form a document."""
        if self._closed:
            raise RuntimeError(f"{self.bin_path}: builder is already finalized or aborted")
        self._documents.append(len(self._lengths))

    def add_document(self, tokens: Any, lengths: Sequence[int] | np.ndarray) -> None:
        """Append a whole document: ``tokens`` split into sequences of ``lengths`` tokens each."""
        arr = self._as_tokens(tokens)
        lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if int(lens.sum()) != len(arr) or (lens.size and lens.min() < 0):
            raise DataError(
                f"{self.bin_path}: document of {len(arr)} tokens does not split into sequence lengths "
                f"summing to {int(lens.sum())}"
            )
        self._data.write(arr.tobytes())
        self._lengths.extend(lens.astype(np.int32))
        self._documents.append(len(self._lengths))

    def add_index(self, other_prefix: str | os.PathLike[str]) -> None:
        """Append every document of the dataset at ``other_prefix`` (same dtype) to this one."""
        if self._closed:
            raise RuntimeError(f"{self.bin_path}: builder is already finalized or aborted")
        other = IndexedDataset(other_prefix)
        try:
            if other.dtype != self.dtype:
                raise DataError(
                    f"{idx_path(other_prefix)}: dtype {other.dtype} does not match the builder's {self.dtype}"
                )
            offset = len(self._lengths)
            self._lengths.extend(other.sequence_lengths)
            self._documents.extend(other.document_indices[1:] + offset)
        finally:
            other.close()
        self._data.flush()
        with open(bin_path(other_prefix), "rb") as source:
            shutil.copyfileobj(source, self._data, _COPY_BUFFER)

    # -- finishing -----------------------------------------------------------------------------------

    def finalize(self, idx_path: str | os.PathLike[str] | None = None) -> None:
        """Write the index and move both files to their final names.

        ``idx_path`` defaults to ``{prefix}.idx``. Sequences added after the last
        :meth:`end_document` are closed into a final document (Megatron would write a document index
        that does not end at the sequence count).
        """
        if self._closed:
            raise RuntimeError(f"{self.bin_path}: builder is already finalized or aborted")
        final_idx = os.fspath(idx_path) if idx_path is not None else _idx_path_of(self.prefix)
        tmp_idx = final_idx + f".tmp{os.getpid()}"
        try:
            if self._documents.last() != len(self._lengths):
                self.end_document()
            self._data.close()
            n, d = len(self._lengths), len(self._documents)
            itemsize = self.dtype.itemsize
            with open(tmp_idx, "wb") as out:
                out.write(INDEX_HEADER)
                out.write(struct.pack("<Q", INDEX_VERSION))
                out.write(struct.pack("<B", _CODE_OF[self.dtype]))
                out.write(struct.pack("<Q", n))
                out.write(struct.pack("<Q", d))
                for block in self._lengths.blocks():
                    out.write(block.astype("<i4", copy=False).tobytes())
                start = 0
                for block in self._lengths.blocks():
                    ends = np.cumsum(block, dtype=np.int64) * itemsize + start
                    pointers = np.empty_like(ends)
                    pointers[0] = start
                    pointers[1:] = ends[:-1]
                    out.write(pointers.astype("<i8", copy=False).tobytes())
                    start = int(ends[-1])
                for block in self._documents.blocks():
                    out.write(block.astype("<i8", copy=False).tobytes())
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(tmp_idx, final_idx)
        except BaseException:
            self.abort()
            if os.path.exists(tmp_idx):
                os.remove(tmp_idx)
            raise
        self._closed = True
        self._lengths.close()
        self._documents.close()

    def abort(self) -> None:
        """Discard everything written so far (no file is left under the final names)."""
        if self._closed:
            return
        self._closed = True
        self._data.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)
        self._lengths.close()
        self._documents.close()

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()

    @property
    def num_sequences(self) -> int:
        """Sequences added so far."""
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        """Documents closed so far."""
        return len(self._documents) - 1
