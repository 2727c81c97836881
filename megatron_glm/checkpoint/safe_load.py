"""Loading checkpoints as data, never as code.

Every ``.pt`` file is read with ``torch.load(weights_only=True)``; the only non-tensor classes allowed are
the few plain-data classes DeepSpeed stores (its loss-scaler state). :class:`SafeCheckpointEngine`
gives DeepSpeed's engine the same rule for the files it reads.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from megatron_glm.errors import CheckpointError


def _deepspeed_safe_types() -> list[Any]:
    types: list[Any] = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16 import loss_scaler

        types += [loss_scaler.LossScaler, loss_scaler.DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        types.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        types.append(fragment_address)
    return types


def safe_torch_load(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors, containers and allow-listed plain-data types.

    ``mmap=True`` maps the tensor storages from the file instead of reading them (pages are read on use).

    Raises :class:`CheckpointError` naming the file for a missing, truncated, corrupt or unsafe file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if mmap and not zipfile.is_zipfile(path) and _is_legacy_torch_file(path):
        mmap = False  # the pre-1.6 (non-zip) format cannot be mapped; it is still read as data only
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_types()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "weights_only" in text or "GLOBAL" in text:
            raise CheckpointError(
                f"{path}: refused: {_unsafe_reason(text)}; a checkpoint must hold only "
                f"tensors and plain data, so this file is not loaded"
            ) from None
        raise CheckpointError(f"{path}: corrupt checkpoint file ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint file ({_first_line(exc)})") from None


def check_data_files(directory: str | Path) -> None:
    """Read every ``.pt`` file under ``directory`` as data (storages mapped, then dropped), so that a loader we
    cannot route through :func:`safe_torch_load` (DeepSpeed's universal-checkpoint loader unpickles with
    ``weights_only=False``) only ever sees files that hold tensors and plain data."""
    for file in sorted(Path(directory).rglob("*.pt")):
        safe_torch_load(file, mmap=True)


_GLOBAL_RE = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)")


def _unsafe_reason(text: str) -> str:
    """What the pickle wanted to import, without PyTorch's advice to retry unsafely."""
    found = _GLOBAL_RE.search(text)
    if found:
        return f"it would import and run {found.group(1)}"
    return "it contains objects other than tensors and plain data"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_legacy_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a pre-1.6 ``torch.save`` file (a pickle, not a zip archive)."""
    with path.open("rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)  # pickle protocol marker


def safe_checkpoint_engine(config_params: Any = None) -> Any:
    """A DeepSpeed checkpoint engine that saves like DeepSpeed's (hashing each file as it writes it, see
    :func:`~megatron_glm.checkpoint.manifest.save_hashed`) and loads with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from megatron_glm.checkpoint.manifest import save_hashed

    class SafeCheckpointEngine(TorchCheckpointEngine):
        written: dict[str, dict[str, Any]]
        """Path -> digest (size, sha256) of every file this rank saved, hashed as it was written."""

        def __init__(self, config_params: Any = None) -> None:
            super().__init__(config_params)
            self.written = {}

        def save(self, state_dict: Any, path: str) -> None:
            serialization = {"_use_new_zipfile_serialization": self.zipfile_serialization}
            self.written[str(path)] = save_hashed(state_dict, path, **serialization)

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location=map_location or "cpu")

    return SafeCheckpointEngine(config_params)
