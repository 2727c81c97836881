"""Checkpoints: atomic save / verified load / resume, safe loading, resharding and format conversion."""

from megatron_glm.checkpoint.formats.standalone import load_pretrained
from megatron_glm.checkpoint.manager import (
    CheckpointManager,
    check_save_dir,
    list_checkpoints,
    read_meta,
    verify_checkpoint,
)
from megatron_glm.checkpoint.safe_load import safe_checkpoint_engine, safe_torch_load

__all__ = [
    "CheckpointManager",
    "check_save_dir",
    "list_checkpoints",
    "load_pretrained",
    "read_meta",
    "safe_checkpoint_engine",
    "safe_torch_load",
    "verify_checkpoint",
]
