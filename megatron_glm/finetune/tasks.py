"""Task files: JSON lines, one example per line; every problem is one line naming the file and line number.

- seq2seq: ``{"source": str, "target": str}``. The source may hold its own ``[MASK]`` / ``[sMASK]`` /
  ``[gMASK]`` (the target fills the first one); otherwise ``[gMASK]`` is appended.
- cloze / multiple choice: ``{"text": "... [MASK] ...", "choices": [str, ...], "label": int}``: exactly
  one ``[MASK]``, at least two non-empty choices, ``0 <= label < len(choices)``.

Blank lines are skipped (the line numbers stay those of the file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from megatron_glm.errors import DataError

BLANKS = ("[MASK]", "[sMASK]", "[gMASK]")


@dataclass(frozen=True)
class Seq2SeqExample:
    source: str
    target: str
    line: int = 0


@dataclass(frozen=True)
class ClozeExample:
    text: str
    choices: tuple[str, ...]
    label: int
    line: int = 0


def _string(row: dict[str, Any], key: str, where: str) -> str:
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _seq2seq(row: dict[str, Any], where: str, line: int) -> Seq2SeqExample:
    source, target = _string(row, "source", where), _string(row, "target", where)
    if not source.strip():
        raise DataError(f"{where}: field 'source' is empty")
    if not target.strip():
        raise DataError(f"{where}: field 'target' is empty")
    return Seq2SeqExample(source, target, line)


def _cloze(row: dict[str, Any], where: str, line: int) -> ClozeExample:
    text = _string(row, "text", where)
    count = text.count("[MASK]")
    if count != 1:
        raise DataError(f"{where}: field 'text' must contain exactly one [MASK], found {count}")
    if "choices" not in row:
        raise DataError(f"{where}: missing field 'choices'")
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(f"{where}: field 'choices' must be a list of at least two non-empty strings")
    if "label" not in row:
        raise DataError(f"{where}: missing field 'label'")
    label = row["label"]
    if not isinstance(label, int) or isinstance(label, bool):
        raise DataError(f"{where}: field 'label' must be an integer index into 'choices', got {label!r}")
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
    return ClozeExample(text, tuple(choices), label, line)


READERS: dict[str, Callable[[dict[str, Any], str, int], Any]] = {"seq2seq": _seq2seq, "cloze": _cloze}


def json_rows(path: str | os.PathLike[str], what: str) -> Iterator[tuple[Any, str, int]]:
    """``(row, "path:line", line number)`` for every non-blank line of the JSON-lines file ``path`` (``what``: how
    the one-line errors name it); unreadable files, bad UTF-8 and bad JSON are :class:`DataError` lines."""
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield row, where, n


def read_task_file(path: str | os.PathLike[str], task: str) -> list[Any]:
    """The examples of a ``task`` (``seq2seq`` or ``cloze``) file, in file order."""
    if task not in READERS:
        raise DataError(f"unknown task {task!r} (expected one of {', '.join(READERS)})")
    out = []
    for row, where, n in json_rows(path, f"{task} file"):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        out.append(READERS[task](row, where, n))
    if not out:
        raise DataError(f"{path}: no {task} examples")
    return out
