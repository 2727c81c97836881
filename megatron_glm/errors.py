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


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point's ``main``; report :class:`GLMError` as ``error: ...`` and exit 2."""
    try:
        return main()
    except GLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
