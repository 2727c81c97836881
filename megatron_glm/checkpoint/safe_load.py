"""Loading checkpoints as data, never as code.

Every ``.pt`` file is read with ``torch.load(weights_only=True)``; the only non-tensor classes allowed are
the few plain-data classes DeepSpeed stores (its loss-scaler state). :class:`SafeCheckpointEngine`
gives DeepSpeed's engine the same rule for the files it reads.
"""

from __future__ import annotations

import contextlib
import pickle
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
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_types()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            raise CheckpointError(f"{path}: refuses to load: it contains objects other than tensors and plain "
                                  f"data ({first})") from None
        raise CheckpointError(f"{path}: corrupt checkpoint file ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint file ({first})") from None


def safe_checkpoint_engine(config_params: Any = None) -> Any:
    """A DeepSpeed checkpoint engine that saves like DeepSpeed's and loads with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location=map_location or "cpu")

    return SafeCheckpointEngine(config_params)
