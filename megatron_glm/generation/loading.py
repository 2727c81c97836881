"""Build a :class:`GLMModel` for inference from one of our training checkpoints (or a standalone export).

A training checkpoint directory (``--save`` of ``pretrain_glm.py``) holds ``global_stepN/`` with
``mp_rank_XX_model_states.pt`` (key ``module``: that tensor-parallel rank's state dict) and ``meta.json``
(layout and the run's config). The newest step with ``meta.json`` and every model shard is used
(``latest`` first); a ``global_stepN`` directory may be given directly. Shards are read with
:func:`~megatron_glm.checkpoint.safe_torch_load` only. At the saved TP size each rank reads its own
shard; at any other TP size the shards are merged into full tensors (by the GLM partition layout) and
re-split for this run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.checkpoint import list_checkpoints, read_meta, safe_torch_load
from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError
from megatron_glm.model import GLMModel, glm_partition, load_full_state_dict
from megatron_glm.parallel import ParallelState, initialize_parallel_state, unshard


def _shard_path(step_dir: Path, tp_rank: int) -> Path:
    return step_dir / f"mp_rank_{tp_rank:02d}_model_states.pt"


def _complete(step_dir: Path) -> bool:
    if not (step_dir / "meta.json").is_file():
        return False
    tp = int(read_meta(step_dir).get("layout", {}).get("tp", 1))
    return all(_shard_path(step_dir, r).is_file() for r in range(tp))


def resolve_step_dir(path: str | os.PathLike[str]) -> Path:
    """The step directory to load: ``path`` itself if it is one, else its newest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / "meta.json").is_file():
        if not _complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (model shards missing)")
        return path
    for tag in list_checkpoints(path):
        if _complete(path / tag):
            return path / tag
    raise CheckpointError(f"{path}: no complete global_stepN checkpoint (meta.json + mp_rank_XX_model_states.pt)")


def model_config_from_meta(meta: dict[str, Any]) -> ModelConfig:
    """The run's :class:`ModelConfig` from ``meta.json`` (unknown keys ignored, dropout off)."""
    saved = meta.get("config", {}).get("model")
    if not isinstance(saved, dict):
        raise CheckpointError("meta.json has no config.model section")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in saved.items() if k in names})
    if cfg.vocab_size <= 0:
        raise CheckpointError("meta.json: config.model.vocab_size is not resolved")
    return dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0, checkpoint_activations=False)


def _module(path: Path) -> dict[str, torch.Tensor]:
    state = safe_torch_load(path)
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{path}: no 'module' state dict in this file")
    return module


def merged_state_dict(step_dir: Path, tp_saved: int) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors from the ``tp_saved`` model shards of a step directory."""
    shards = [_module(_shard_path(step_dir, r)) for r in range(tp_saved)]
    full: dict[str, torch.Tensor] = {}
    for name, first in shards[0].items():
        spec = glm_partition(name)
        if tp_saved > 1 and spec is not None:
            try:
                full[name] = unshard([s[name] for s in shards], *spec)
            except KeyError:
                raise CheckpointError(f"{step_dir}: {name} is missing from a tensor-parallel shard") from None
        else:
            full[name] = first
    return full


def load_model(path: str | os.PathLike[str], parallel_state: ParallelState | None = None, *,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
               ) -> tuple[GLMModel, dict[str, Any]]:
    """``(model in eval mode, meta)`` from a checkpoint directory, on ``device`` with ``dtype`` parameters.

    ``meta`` is the checkpoint's ``meta.json`` (``config`` holds the run's full config: tokenizer path,
    data, objective). Collective-free; every tensor-parallel rank calls it.
    """
    ps = parallel_state or ParallelState()
    path = Path(path)
    if not (path / "meta.json").is_file() and not list_checkpoints(path) and path.exists():
        return _load_standalone(path, ps, device, dtype)
    step_dir = resolve_step_dir(path)
    meta = read_meta(step_dir)
    if int(meta.get("layout", {}).get("pp", 1)) != 1:
        raise CheckpointError(f"{step_dir}: pipeline-parallel checkpoints are not supported for generation")
    tp_saved = int(meta.get("layout", {}).get("tp", 1))
    cfg = model_config_from_meta(meta)
    if cfg.vocab_size % ps.tp_size:
        raise CheckpointError(f"{step_dir}: vocab size {cfg.vocab_size} does not split over TP {ps.tp_size}")
    model = GLMModel(cfg, ps, seed=0, params_dtype=dtype, device=device)
    if tp_saved == ps.tp_size:
        own = _module(_shard_path(step_dir, ps.tp_rank))
        try:
            model.load_state_dict(own, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{step_dir}: model shard does not fit: {str(exc).splitlines()[0]}") from None
    else:
        load_full_state_dict(model, merged_state_dict(step_dir, tp_saved), ps)
    meta = dict(meta, step_dir=str(step_dir))
    return model.eval(), meta


def _load_standalone(path: Path, ps: ParallelState, device: torch.device | str | None,
                     dtype: torch.dtype) -> tuple[GLMModel, dict[str, Any]]:
    # HOOK (issue 8, checkpoint conversion): standalone exports (config.json + model.safetensors, written by
    # tools/convert_checkpoint.py --format safetensors) load through GLMModel.from_pretrained (one process);
    # under TP the full tensors are then re-split for this rank.
    from_pretrained = getattr(GLMModel, "from_pretrained", None)
    if from_pretrained is None:
        raise CheckpointError(f"{path}: not a training checkpoint (no meta.json or global_stepN), and standalone "
                              f"exports need GLMModel.from_pretrained (checkpoint conversion, not available yet)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: neither a training checkpoint (meta.json, global_stepN) nor a standalone "
                              f"export (config.json + model.safetensors)")
    model = from_pretrained(str(path), device=device if ps.tp_size == 1 else "cpu", dtype=dtype)
    if ps.tp_size > 1:
        full = model.state_dict()
        model = GLMModel(model.config, ps, seed=0, params_dtype=dtype, device=device)
        load_full_state_dict(model, full, ps)
    tokenizer = sorted(path.glob("tokenizer*.model"))
    config = {"model": dataclasses.asdict(model.config),
              "data": {"tokenizer_model": str(tokenizer[0]) if tokenizer else ""}}
    return model.eval(), {"config": config, "step_dir": str(path)}


def init_inference(tp_size: int | None = None) -> tuple[ParallelState, torch.device]:
    """Parallel state and device for a tool: one process, or ``torchrun --nproc_per_node N`` with TP = N
    (``tp_size``, default the world size). NCCL and ``cuda:LOCAL_RANK`` on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()) \
        if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # checkpoint loading imports deepspeed: no GPU warning
    if world == 1:
        return ParallelState(), device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    tp = world if tp_size is None else tp_size
    return initialize_parallel_state(tp_size=tp), device
