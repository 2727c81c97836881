"""User-facing errors: one clear line naming the file/field and what was expected."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
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


#: How long an exiting entry point waits for its process groups to shut down before it leaves with ``os._exit``.
SHUTDOWN_SECONDS = 20.0


def release_distributed(code: int, timeout: float = SHUTDOWN_SECONDS) -> None:
    """Destroy this process's torch.distributed process groups (if any) before the interpreter exits.

    Left to interpreter shutdown, a live gloo/NCCL group's C++ threads sometimes meet their destructors first:
    ``terminate called without an active exception`` and rc 134 after the run's own one-line error. If the
    shutdown itself does not finish within ``timeout`` (a peer gone mid-collective), the process leaves at once
    with ``code`` (stdio flushed): the exit status is the documented one either way.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    done = threading.Event()

    def shutdown() -> None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        done.set()

    threading.Thread(target=shutdown, name="release_distributed", daemon=True).start()
    if not done.wait(timeout):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point's ``main``; report :class:`GLMError` as ``error: ...`` and exit 2 (130 on Ctrl-C, 1
    with the traceback on any other exception). Process groups are shut down before every exit."""
    code = 0
    try:
        return main()
    except GLMError as exc:
        # One write of the whole line: the ranks of a job share stderr, and print()'s separate write of the
        # newline let two ranks' lines run together.
        sys.stderr.write(f"error: {one_line(exc)}\n")
        sys.stderr.flush()
        code = 2
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
        raise SystemExit(130) from None
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except BaseException:
        traceback.print_exc()
        code = 1
        raise SystemExit(1) from None
    finally:
        release_distributed(code, SHUTDOWN_SECONDS)
