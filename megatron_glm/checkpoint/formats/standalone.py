"""Standalone model: ``model.safetensors`` (or shards ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json``), ``config.json`` with the model fields, and the tokenizer files.

Loadable without DeepSpeed: :func:`load_pretrained` (``megatron_glm.checkpoint.load_pretrained``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.safetensors_file import open_safetensors, read_header
from megatron_glm.checkpoint.stream import SourceInfo, iter_layers
from megatron_glm.checkpoint.weights import materialize
from megatron_glm.config import ModelConfig
from megatron_glm.dtypes import DTYPE_NAMES, DTYPES
from megatron_glm.errors import CheckpointError
from megatron_glm.model import GLMModel, ModelLayout

from .common import model_config_from_dict

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
DEFAULT_SHARD_BYTES = 2 * 2**30


def is_standalone(path: Path) -> bool:
    return (path / CONFIG).is_file() and ((path / WEIGHTS).is_file() or (path / INDEX).is_file())


def read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    f = path / CONFIG
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{f}: cannot read the model config ({exc})") from None
    return model_config_from_dict(raw, str(f)), raw


def read_weight_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``*.index.json`` (tensor name -> shard file)."""
    try:
        wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a weight index ({exc})") from None
    return dict(wm)


def check_shards(path: Path, weight_map: dict[str, str]) -> None:
    """Every shard the map names exists, has a sound safetensors header and holds the tensors mapped to it."""
    missing = sorted({v for v in weight_map.values() if not (path / v).is_file()})
    if missing:
        raise CheckpointError(f"{path}: missing weight shards: {', '.join(missing)}")
    for fname in sorted(set(weight_map.values())):
        if not fname.endswith(".safetensors"):
            continue
        held = read_header(path / fname)
        absent = [k for k, v in weight_map.items() if v == fname and k not in held]
        if absent:
            raise CheckpointError(
                f"{path / fname}: lacks {len(absent)} tensors its index maps to it, e.g. {absent[:3]}"
            )


class StandaloneSource:
    """A standalone model directory, read one tensor at a time (safetensors are memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not is_standalone(path):
            raise CheckpointError(f"{path}: not a standalone GLM model ({CONFIG} + {WEIGHTS} or {INDEX})")
        config, self.raw_config = read_config(path)
        if (path / INDEX).is_file():
            weight_map = read_weight_index(path / INDEX)
        else:
            weight_map = dict.fromkeys(read_header(path / WEIGHTS), WEIGHTS)
        check_shards(path, weight_map)
        self.path, self.weight_map = path, weight_map
        tok = [str(p) for p in sorted(path.glob("tokenizer*")) if p.is_file()]
        self.info = SourceInfo(format="safetensors", path=str(path), config=config, tokenizer_files=tok)
        self.info.layout.check_names(weight_map, str(path))
        self._open: dict[str, Any] = {}
        self._names = self.info.layout.names()

    def names(self) -> list[str]:
        return list(self._names)

    def tensor(self, name: str) -> torch.Tensor:
        fname = self.weight_map[name]
        if fname not in self._open:
            self._open[fname] = open_safetensors(self.path / fname)
        return self._open[fname].get_tensor(name)

    module_tensor = tensor

    def optimizer_state(self, name: str) -> None:
        return None

    def release(self) -> None:
        self._open.clear()


def write_weight_shards(
    src: Any,
    out: Path,
    layout: ModelLayout,
    *,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    max_shard_bytes: int,
    rename: Callable[[str], str] = lambda name: name,
    expand: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None = None,
) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` (whole
    tensors; a larger tensor gets a shard of its own) with ``model.safetensors.index.json``. Tensors are stored
    under ``rename(name)``; ``fp32``-role tensors stay fp32, the rest become ``dtype``. ``expand(name, t)`` instead
    gives the stored ``(name, tensor)`` pairs for our tensor ``t`` (a repacked tensor and the ones derived from
    it). Returns the files."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    files: list[str] = []
    weight_map: dict[str, int] = {}
    total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            tmp = out / f".shard{len(files):05d}.safetensors"
            save_file(pending, str(tmp), metadata={"format": "pt"})
            files.append(tmp.name)
            for k in pending:
                weight_map[k] = len(files) - 1
            pending, pending_bytes = {}, 0

    for _, run in iter_layers(src.names()):
        for name in run:
            keep = dtype if layout[name].dtype == "params" else torch.float32
            t = transform(name, src.tensor(name)).to(keep).contiguous().clone()
            for key, value in expand(name, t) if expand is not None else [(rename(name), t)]:
                value = value.contiguous()
                size = value.numel() * value.element_size()
                if pending and pending_bytes + size > max_shard_bytes:
                    flush()
                pending[key] = value
                pending_bytes += size
                total += size
        src.release()
    flush()
    n = len(files)
    names = [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, final in zip(files, names):
        os.replace(out / tmp, out / final)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
        (out / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return names


def write_standalone(
    src: Any,
    out: Path,
    config: ModelConfig,
    *,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    tokenizer_files: list[str],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write the standalone model; returns the weight files written. Shards hold whole tensors."""
    names = write_weight_shards(
        src, out, ModelLayout(config), transform=transform, dtype=dtype, max_shard_bytes=max_shard_bytes
    )
    fields = {
        "architectures": ["GLMModel"],
        "model_type": "glm",
        "torch_dtype": DTYPE_NAMES[dtype],
        **dataclasses.asdict(config),
    }
    fields.pop("size", None)
    (out / CONFIG).write_text(json.dumps(fields, indent=1), encoding="utf-8")
    for f in tokenizer_files:
        suffix = Path(f).suffix
        shutil.copyfile(f, out / f"tokenizer{suffix}")
    return names


def load_pretrained(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> GLMModel:
    """A single-process :class:`GLMModel` in eval mode from a standalone directory (``config.json`` +
    ``model.safetensors``, as ``tools/convert_checkpoint.py --format safetensors`` writes it); no DeepSpeed
    needed. One tensor in memory at a time; ``dtype`` defaults to the export's ``torch_dtype``."""
    src = StandaloneSource(path)
    config = src.info.config
    dtype = dtype or DTYPES.get(src.raw_config.get("torch_dtype", "float32"), torch.float32)
    model = materialize(GLMModel(config, params_dtype=dtype, device="meta"), device)  # every tensor is loaded below
    own = model.state_dict()
    extra = [k for k in own if k not in src.weight_map]
    if extra:
        raise CheckpointError(f"{path}: weights lack {len(extra)} model tensors, e.g. {extra[:3]}")
    with torch.no_grad():
        for name, param in own.items():
            t = src.tensor(name)
            if t.shape != param.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {list(t.shape)}, the model expects {list(param.shape)}"
                )
            param.copy_(t)
    src.release()
    return model.eval()
