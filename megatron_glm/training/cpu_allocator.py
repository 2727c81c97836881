"""How a CPU run's large tensors get their memory (``--cpu-allocator``).

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold (at most 32 MiB) with
fresh ``mmap`` pages and unmaps them when the block is freed; a training step allocates and frees the same large
activations and gradients every time, so each one costs a page fault per 4 KiB page on first touch and an unmap
on free (measured here: a fresh 64 MiB ``index_select`` 33 ms, into a reused block 4.5 ms). ``heap`` turns that
off for the run: no ``mmap`` for large blocks (``M_MMAP_MAX`` 0) and freed memory at the top of the heap kept up to
1 GiB (``M_TRIM_THRESHOLD``), so the next step reuses the pages, as jemalloc or tcmalloc would (what PyTorch's
``torch.backends.xeon.run_cpu`` launcher preloads for the same reason). The resident set then stays near the run's
peak between steps instead of falling back. ``system`` keeps glibc's defaults. Only CPU runs on glibc are touched;
:func:`cpu_allocator` returns how to restore the defaults (and give the kept memory back) when the run ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import torch

CPU_ALLOCATORS = ("heap", "system")
KEEP_FREED_BYTES = 1 << 30  # M_TRIM_THRESHOLD under ``heap``: freed top-of-heap memory kept for reuse

# mallopt parameters (malloc.h) and glibc's defaults for the two it changes
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (``mallopt`` and ``malloc_trim`` are glibc's), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return None
    return libc


def _restore(libc: ctypes.CDLL) -> None:
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)  # the kept memory back to the system


def cpu_allocator(mode: str, device: torch.device) -> tuple[str, Callable[[], None] | None]:
    """Apply ``mode`` (:data:`CPU_ALLOCATORS`) for a run on ``device``: (a line for the log, the restore call, or
    None when nothing was changed: ``system``, a non-CPU device, no glibc)."""
    if mode not in CPU_ALLOCATORS:
        raise ValueError(f"cpu allocator {mode!r}: expected one of {', '.join(CPU_ALLOCATORS)}")
    if mode == "system" or device.type != "cpu":
        return "", None
    libc = _glibc()
    if libc is None:
        return "cpu allocator: heap needs glibc's mallopt (not found): the system's malloc as it is", None
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)):
        _restore(libc)
        return "cpu allocator: glibc refused mallopt: the system's malloc as it is", None
    return (
        f"cpu allocator: heap (large tensors from glibc's heap, up to {KEEP_FREED_BYTES >> 20} MiB of freed memory "
        "kept for reuse; --cpu-allocator system: glibc's defaults)",
        lambda: _restore(libc),
    )
