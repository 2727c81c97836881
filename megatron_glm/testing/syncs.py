"""Count host synchronisations on any device, CPU included.

On CUDA a host synchronisation is any call that makes Python wait for the GPU: reading a value (``item()``,
``float()``, ``int()``, ``bool()``, comparisons in ``if``: all ``aten._local_scalar_dense``), a data-dependent
output shape (``nonzero``, ``unique``, ``masked_select``, boolean indexing, ``bincount``, ``repeat_interleave``
without ``output_size``), a copy to the host (``cpu()``, ``tolist()``, ``numpy()``) or
``torch.cuda.synchronize()``. CPU has no such waits, so CPU tests count the calls that would be one instead:
:class:`HostSyncCounter` sees every aten operation (a dispatch mode) and patches the Python-level copies.
Host-side work on the data loader's tensors is no synchronisation on any device: run it inside
:meth:`HostSyncCounter.host` to leave it out.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
SYNC_OPS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.nonzero_numpy.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.masked_select.default,
    _aten.bincount.default,
    _aten.repeat_interleave.Tensor,
    _aten.equal.default,
}
"""Operations that wait for the device (a value read, or an output shape that depends on the data)."""

_HOST_COPIES = ("cpu", "tolist", "numpy")


def _bool_index(func: Any, args: tuple) -> bool:
    """``x[mask]`` / ``x[mask] = v`` with a boolean mask: the kept count is read from the device."""
    if func not in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])


class HostSyncCounter(TorchDispatchMode):
    """Counts host synchronisations while active (see the module doc): ``total`` and ``by_kind``; ``where``
    keeps the innermost caller of each (``file:line``) for messages."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: Counter[str] = Counter()
        self.where: list[str] = []
        self._host_depth = 0
        self._saved: dict[str, Any] = {}
        self._accelerator: Any = None

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def _count(self, kind: str) -> None:
        if self._host_depth:
            return
        self.by_kind[kind] += 1
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
        self.where.append(f"{kind} at {frames[-1].filename}:{frames[-1].lineno}" if frames else kind)

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Work on host tensors (the loader's batch before it is moved): not counted."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in SYNC_OPS or _bool_index(func, args):
            self._count(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncCounter:
        for name in _HOST_COPIES:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def copy(t: torch.Tensor, *a: Any, _name: str = name, _orig: Any = original, **k: Any) -> Any:
                self._count(_name)
                with self.host():  # the copy itself is counted once, not the ops it runs
                    return _orig(t, *a, **k)

            setattr(torch.Tensor, name, copy)
        self._saved["synchronize"] = torch.cuda.synchronize
        torch.cuda.synchronize = lambda *a, **k: self._count("cuda.synchronize")
        if "deepspeed" in sys.modules:  # DeepSpeed waits through its accelerator (a no-op on CPU)
            from deepspeed.accelerator import get_accelerator

            self._accelerator = get_accelerator()
            self._accelerator.synchronize = lambda *a, **k: self._count("accelerator.synchronize")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        torch.cuda.synchronize = self._saved.pop("synchronize")
        if self._accelerator is not None:
            del self._accelerator.synchronize  # the class's method again
            self._accelerator = None
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
