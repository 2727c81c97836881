"""The architecture a checkpoint records, and a run that loads one taking it (resume, weights-only loading, a
LoRA run's base).

Our step directories record the whole model config in ``meta.json`` (read here without opening the weights);
every other format we read yields its architecture through its source (config.json, model_config.json, or the
family a released layout holds). :func:`adopt_checkpoint_architecture` applies
:func:`megatron_glm.config.architecture.adopt_architecture` with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron_glm.checkpoint.manager import META, list_checkpoints, read_meta
from megatron_glm.config import Architecture, GLMConfig
from megatron_glm.config.architecture import adopt_architecture
from megatron_glm.errors import CheckpointError


def checkpoint_architecture(path: str | Path, *, any_format: bool = True) -> tuple[Architecture, str] | None:
    """``(architecture, where it was read)`` of the checkpoint at ``path``: a step directory or a save directory
    (its newest checkpoint's ``meta.json``), or with ``any_format`` any checkpoint we read. ``None`` for a
    directory without a checkpoint of ours when not ``any_format`` (a resume that starts from scratch)."""
    path = Path(path)
    tags = [path] if (path / META).is_file() else [path / t for t in list_checkpoints(path)]
    for step in tags:
        if not (step / META).is_file():
            continue
        model = (read_meta(step).get("config") or {}).get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{step / META}: not a megatron_glm checkpoint (no config.model)")
        return Architecture.from_dict(model), str(step / META)
    if not any_format:
        return None
    from megatron_glm.checkpoint.formats.registry import open_source  # the formats import the model; keep this lazy

    src = open_source(path)
    try:
        return src.info.config.architecture(), src.info.path
    finally:
        src.release()


def adopt_checkpoint_architecture(cfg: GLMConfig, log: Callable[[str], None] = print) -> GLMConfig:
    """``cfg`` with the architecture of the checkpoint it starts from: ``cfg.checkpoint.load`` (a resume or
    weights), else a LoRA run's base (``lora.base``, any format we read); unchanged without one, or when a resume
    finds no checkpoint there and there is no base. A contradicting command line is a one-line error naming each
    field."""
    found = None
    if cfg.checkpoint.load:
        found = checkpoint_architecture(cfg.checkpoint.load, any_format=cfg.checkpoint.load_weights_only)
    if found is None and cfg.lora.rank > 0 and cfg.lora.base:
        found = checkpoint_architecture(cfg.lora.base)
    if found is None:
        return cfg
    saved, where = found
    return adopt_architecture(cfg, saved, where, log)
