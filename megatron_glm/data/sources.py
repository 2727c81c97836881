"""Corpus files as people store them: plain, gzip or zstandard JSONL / text, and Parquet.

:func:`describe` finds what a file is from its first bytes (gzip ``1f 8b``, zstandard ``28 b5 2f fd``,
Parquet ``PAR1``), the extension only confirming it (a ``.gz`` name on a file that is not gzip is an
error) and, for line files, whether each line is a JSON object or a plain text document (``.jsonl`` /
``.json`` / ``.ndjson`` and ``.txt`` / ``.text`` decide; otherwise the first non-blank line does). Everything
is streamed: lines are read one at a time through the decompressors, Parquet a batch of rows at a time
(with the text columns named by the JSON keys), so memory does not grow with the file.

:func:`iter_records` yields ``(texts, problem)`` for each record of a :class:`WorkUnit` (a byte range of a
plain file, a whole compressed file, one Parquet row group), judged by :func:`~megatron_glm.data.corpus.
parse_line` for line files, so every container gives the same documents in the same order.

zstandard and pyarrow are optional (``pip install 'megatron_glm[corpora]'``); a file that needs one
that is missing is a one-line error.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, BinaryIO

from megatron_glm.data.corpus import INPUT_FORMATS, LineProblem, parse_line
from megatron_glm.errors import DataError

__all__ = ["CONTAINERS", "SourceFile", "WorkUnit", "describe", "iter_records", "iter_texts", "open_lines", "plan_units"]

CONTAINERS = ("plain", "gzip", "zstd", "parquet")
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"PAR1": "parquet"}
_EXT_CONTAINER = {
    ".gz": "gzip",
    ".gzip": "gzip",
    ".zst": "zstd",
    ".zstd": "zstd",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".text": "text"}
_PARQUET_BATCH_ROWS = 256


@dataclass(frozen=True)
class SourceFile:
    """One input file: its container and how its records are read (``jsonl``, ``text`` or ``parquet``)."""

    path: str
    container: str
    record_format: str
    size: int


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one file read by one worker: bytes ``[start, end)`` of a plain file, a whole compressed
    file (``start = 0, end = size``), or Parquet row group ``start``."""

    index: int
    file_index: int
    source: SourceFile
    start: int
    end: int

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def input_bytes(self) -> int:
        """Bytes of the input file this unit accounts for (for progress)."""
        if self.source.container == "parquet":
            return self.source.size if self.start == 0 else 0
        return self.end - self.start


def _container_of(path: str) -> str:
    with open(path, "rb") as stream:
        head = stream.read(4)
    by_content = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), "plain")
    ext = os.path.splitext(path)[1].lower()
    by_name = _EXT_CONTAINER.get(ext)
    if by_name is not None and by_name != by_content:
        raise DataError(
            f"{path}: the name says {by_name} but the content is "
            f"{'plain text' if by_content == 'plain' else by_content} (first bytes {head!r})"
        )
    return by_content


def _line_format(path: str, container: str, input_format: str) -> str:
    if input_format in ("jsonl", "text"):
        return input_format
    stem = path
    if container in ("gzip", "zstd"):
        stem = os.path.splitext(path)[0]
    by_name = _EXT_FORMAT.get(os.path.splitext(stem)[1].lower())
    if by_name is not None:
        return by_name
    with open_lines(SourceFile(path, container, "text", 0)) as stream:
        for raw in stream:
            if raw.strip():
                return "jsonl" if raw.lstrip().startswith(b"{") else "text"
    return "jsonl"


def describe(path: str, input_format: str = "auto") -> SourceFile:
    """What ``path`` holds (see the module docstring); ``input_format`` ``jsonl``/``text`` forces line files."""
    container = _container_of(path)
    if container == "parquet":
        record_format = "parquet"
    else:
        record_format = _line_format(path, container, input_format)
    return SourceFile(path, container, record_format, os.path.getsize(path))


def _zstd_reader(stream: BinaryIO, path: str) -> Any:
    try:
        import zstandard
    except ImportError:
        raise DataError(
            f"{path}: reading zstandard files needs the zstandard package (pip install 'megatron_glm[corpora]')"
        ) from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True), 1 << 20)


@contextlib.contextmanager
def open_lines(source: SourceFile) -> Iterator[BinaryIO]:
    """A binary stream of the (decompressed) lines of a line file; decoding errors become :class:`DataError`."""
    raw = open(source.path, "rb")  # noqa: SIM115 - closed below
    try:
        if source.container == "gzip":
            stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
        elif source.container == "zstd":
            stream = _zstd_reader(raw, source.path)
        else:
            stream = raw
        try:
            yield stream
        except (EOFError, OSError, zlib.error) as exc:
            what = "read" if source.container == "plain" else f"decompress ({source.container})"
            raise DataError(f"{source.path}: cannot {what}: {exc} (truncated or corrupt file?)") from None
        except Exception as exc:
            if type(exc).__module__.startswith("zstd"):
                raise DataError(f"{source.path}: cannot decompress: {exc} (truncated or corrupt file?)") from None
            raise
    finally:
        raw.close()


def _parquet_file(path: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs the pyarrow package (pip install 'megatron_glm[corpora]')"
        ) from None
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError types
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def plan_units(sources: Sequence[SourceFile | str], chunk_bytes: int) -> list[WorkUnit]:
    """Cut plain files into byte ranges of about ``chunk_bytes`` starting at line starts; a compressed file
    is one unit, a Parquet file one unit per row group."""
    units: list[WorkUnit] = []
    for file_index, source in enumerate(sources):
        if isinstance(source, str):
            source = describe(source)
        if source.container == "parquet":
            for group in range(_parquet_file(source.path).metadata.num_row_groups):
                units.append(WorkUnit(len(units), file_index, source, group, group + 1))
            continue
        size = source.size
        bounds = [0]
        if source.container == "plain":
            with open(source.path, "rb") as stream:
                target = chunk_bytes
                while target < size:
                    stream.seek(target - 1)
                    stream.readline()  # the boundary is just after the newline ending this line
                    bound = stream.tell()
                    if bound >= size:
                        break
                    bounds.append(bound)
                    target = bound + chunk_bytes
        bounds.append(size)
        for start, end in pairwise(bounds):
            if end > start or size == 0:
                units.append(WorkUnit(len(units), file_index, source, start, end))
    return units


def iter_records(unit: WorkUnit, keys: Sequence[str]) -> Iterator[tuple[list[str] | None, LineProblem | None]]:
    """``(texts, None)``, ``(None, problem)`` or ``(None, None)`` (a blank line) for each record of ``unit``."""
    source = unit.source
    if source.record_format == "parquet":
        yield from _parquet_records(unit, keys)
        return
    with open_lines(source) as stream:
        if source.container == "plain":
            stream.seek(unit.start)
            position = unit.start
            for raw in stream:
                if position >= unit.end:
                    break
                position += len(raw)
                yield parse_line(raw, source.record_format, keys)
        else:
            for raw in stream:
                yield parse_line(raw, source.record_format, keys)


def iter_texts(
    paths: Sequence[str], input_format: str = "auto", key: str = "text", strict: bool = False
) -> Iterator[str]:
    """Texts of every usable record of ``paths`` (any container this module reads); bad records are skipped, or
    fatal with ``strict``."""
    if input_format not in INPUT_FORMATS:
        raise DataError(f"--input-format {input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
    sources = [describe(path, input_format) for path in paths]
    for unit in plan_units(sources, 1 << 62):
        for lineno, (texts, problem) in enumerate(iter_records(unit, [key]), 1):
            if problem is not None and strict:
                raise DataError(f"{unit.path}:{lineno}: {problem.message}")
            if texts is not None and texts[0]:
                yield texts[0]


def _parquet_records(unit: WorkUnit, keys: Sequence[str]) -> Iterator[tuple[list[str] | None, LineProblem | None]]:
    pf = _parquet_file(unit.path)
    names = pf.schema_arrow.names
    missing = [key for key in keys if key not in names]
    if missing:
        raise DataError(
            f"{unit.path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)}); "
            f"name the text column with --json-keys"
        )
    try:
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[unit.start], columns=list(keys))
        for batch in batches:
            columns = [batch.column(i).to_pylist() for i in range(len(keys))]
            for values in zip(*columns):
                yield _parquet_row(values, keys)
    except DataError:
        raise
    except Exception as exc:  # pyarrow's own error types
        raise DataError(f"{unit.path}: cannot read row group {unit.start} ({str(exc).splitlines()[0]})") from None


def _parquet_row(values: Sequence[Any], keys: Sequence[str]) -> tuple[list[str] | None, LineProblem | None]:
    texts = []
    for key, value in zip(keys, values):
        if value is None:
            return None, LineProblem("missing_key", f"key {key!r} is null")
        if not isinstance(value, str):
            return None, LineProblem("not_a_string", f"key {key!r} is {type(value).__name__}, expected a string")
        texts.append(value)
    return texts, None
