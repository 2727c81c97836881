"""Reading corpora (JSONL or plain text, one document per line) and the embedded default corpus.

Input files are read line by line in binary mode; nothing reads a whole file. :func:`parse_line`
turns one raw line into the texts of the requested JSON keys or the reason it is unusable, and is
shared by tokenizer training and preprocessing so both judge bad input the same way (the containers that hold
the lines, and ``iter_texts`` over them, are :mod:`~megatron_glm.data.sources`, which builds on this module).

The embedded default corpus is Python's own documentation topics (``pydoc_data.topics``, shipped
with every CPython: 79 documents, about 0.5 MB of English prose), so a quick start needs no download.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

from megatron_glm.errors import DataError

__all__ = [
    "INPUT_FORMATS",
    "PROBLEM_KINDS",
    "LineProblem",
    "expand_inputs",
    "parse_line",
    "pydoc_documents",
    "write_jsonl",
]

INPUT_FORMATS = ("auto", "jsonl", "text")


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Input files named by ``patterns`` (paths or globs), each glob sorted, in the order given."""
    if isinstance(patterns, str):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise DataError(f"--input {pattern}: no file matches this pattern")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise DataError(f"--input {pattern}: file not found")
    if not paths:
        raise DataError("--input: no input file given")
    return paths


class LineProblem(NamedTuple):
    """Why a line was skipped: ``kind`` is one of :data:`PROBLEM_KINDS`, ``message`` says more."""

    kind: str
    message: str


#: Kinds of bad input, in the order summaries list them.
PROBLEM_KINDS = ("invalid_utf8", "invalid_json", "missing_key", "not_a_string", "invalid_unicode", "empty_document")


def parse_line(raw: bytes, input_format: str, keys: Sequence[str]) -> tuple[list[str] | None, LineProblem | None]:
    """``(texts, None)`` for a usable line, ``(None, problem)`` for a bad one, ``(None, None)`` if blank.

    ``texts`` has one string per key (JSONL) or the line without its newline (text format). Blank
    lines (whitespace only) are no documents and no problem.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, LineProblem("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
    if not line.strip():
        return None, None
    if input_format == "text":
        return [line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line], None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        reason = exc.msg.removesuffix(" at")
        return None, LineProblem("invalid_json", f"invalid JSON ({reason} at column {exc.colno})")
    if not isinstance(record, dict):
        return None, LineProblem("invalid_json", f"expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            return None, LineProblem("missing_key", f"missing key {key!r}")
        value = record[key]
        if not isinstance(value, str):
            return None, LineProblem("not_a_string", f"key {key!r} is {type(value).__name__}, expected a string")
        if b"\\u" in raw and _has_surrogate(value):
            return None, LineProblem(
                "invalid_unicode", f"key {key!r} holds a lone surrogate escape (\\ud800-\\udfff), which is no character"
            )
        texts.append(value)
    return texts, None


def _has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (only a JSON ``\\uXXXX`` escape can put one there)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def pydoc_documents() -> list[tuple[str, str]]:
    """``(topic, text)`` of every documentation topic bundled with this Python, sorted by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it
        raise DataError(f"pydoc_data.topics is not available in this Python ({exc})") from None
    return sorted(topics.items())


def write_jsonl(path: str | os.PathLike[str], records: Sequence[dict[str, str]]) -> None:
    """Write ``records`` as JSONL (UTF-8, one object a line) atomically."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DataError(f"{path}: output directory {directory} does not exist")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False))
                out.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
