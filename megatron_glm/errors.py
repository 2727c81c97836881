"""User-facing errors: one clear line naming the file/field and what was expected."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class GLMError(Exception):
    """An error caused by user input (config, files, flags); printed as one line, no traceback."""


class ConfigError(GLMError):
    """The configuration is invalid; the message lists every problem found."""


class DataError(GLMError):
    """A data file (corpus, .bin/.idx, tokenizer model) is missing, malformed or inconsistent."""


class CheckpointError(GLMError):
    """A checkpoint is missing, incomplete, corrupt or incompatible."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line; an error re-raised from a DataLoader worker ("Caught DataError in
    DataLoader worker process 0. Original Traceback ...") gives back the worker's own message."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), text)
        name = type(exc).__name__
        for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                return last[len(prefix) :]
        return last
    return " ".join(text.split("\n")) if "\n" in text else text


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point's ``main``; report :class:`GLMError` as ``error: ...`` and exit 2."""
    try:
        return main()
    except GLMError as exc:
        # One write of the whole line: the ranks of a job share stderr, and print()'s separate write of the
        # newline let two ranks' lines run together.
        sys.stderr.write(f"error: {one_line(exc)}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
