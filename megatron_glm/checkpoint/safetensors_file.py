"""Reading ``.safetensors`` files: the header is checked before safetensors sees the file.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) and the tensor bytes. safetensors itself
reports a damaged file as a Rust-side ``SafetensorError`` (or worse, an allocation for a huge length);
:func:`read_header` checks every field against the file's size first and raises :class:`CheckpointError`
naming the file and the defect, and :func:`open_safetensors` hands only a checked file to ``safe_open``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from megatron_glm.errors import CheckpointError

__all__ = ["ITEM_BYTES", "SafetensorsHeader", "open_safetensors", "read_header"]

#: Bytes per element of every dtype name safetensors writes for the dtypes torch has.
ITEM_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

#: The largest header safetensors itself accepts (100 MB).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsHeader(dict):
    """``{name: (dtype, shape, (begin, end))}`` of a checked file; ``metadata`` holds ``__metadata__``."""

    metadata: dict[str, str]


def _bad(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt safetensors file: {problem}")


def _entry(path: Path, name: str, entry: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not isinstance(entry, dict):
        raise _bad(path, f"tensor {name!r} has no dtype/shape/data_offsets record")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEM_BYTES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(path, f"tensor {name!r} has shape {shape!r} (expected a list of non-negative integers)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"tensor {name!r} has data_offsets {offsets!r} (expected [begin, end], 0 <= begin <= end)")
    nbytes = math.prod(shape) * ITEM_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(
            path,
            f"tensor {name!r} ({dtype}, shape {shape}) needs {nbytes} bytes but its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}",
        )
    return dtype, tuple(shape), (offsets[0], offsets[1])


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """The checked header of ``path``: sane length, JSON, known dtypes, ``shape x itemsize`` equal to each
    tensor's byte span, spans back to back inside the body, and a body exactly as long as they need (a
    truncated file is named as such). Raises :class:`CheckpointError` (one line, the file and the defect)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            head = stream.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise _bad(path, f"header length {length} does not fit a file of {size} bytes (truncated or foreign)")
            raw = stream.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _bad(path, "header is not a JSON object")
    header = SafetensorsHeader()
    metadata = record.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _bad(path, "__metadata__ is not an object")
    header.metadata = metadata
    for name, entry in record.items():
        header[name] = _entry(path, name, entry)
    body = size - 8 - length
    end = 0
    for name, (_, _, (begin, stop)) in sorted(header.items(), key=lambda item: item[1][2]):
        if begin != end:
            how = "overlap" if begin < end else "leave a gap after"
            raise _bad(path, f"tensor {name!r} data_offsets [{begin}, {stop}] {how} the previous tensor's (end {end})")
        end = stop
    if end > body:
        raise _bad(path, f"truncated: the tensors need {end} bytes of data, the file has {body}")
    if end < body:
        raise _bad(path, f"{body - end} bytes after the last tensor's data (damaged or not a safetensors file)")
    return header


def open_safetensors(path: str | os.PathLike[str]) -> Any:
    """``safetensors.safe_open(path, framework="pt")`` after :func:`read_header` checked the file."""
    from safetensors import SafetensorError, safe_open

    read_header(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise _bad(Path(path), str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
