"""Start a run from a checkpoint's model weights only (``checkpoint.load_weights_only``).

Used for checkpoints written without optimizer state (e.g. converted from ZeRO-3 or from another format) and
for fine-tuning: the weights are loaded into the model before the DeepSpeed engine is built, so every ZeRO
stage works; optimizer, learning-rate schedule, step and data position start fresh.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from megatron_glm.checkpoint.formats.native import find_step_dir, model_file
from megatron_glm.checkpoint.manager import read_meta
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.errors import CheckpointError


def load_model_weights(model: nn.Module, load_dir: str | Path, tp_size: int, tp_rank: int, pp_size: int = 1) -> Path:
    """Load this tensor-parallel rank's weights from the newest complete checkpoint of ``load_dir``."""
    step = find_step_dir(Path(load_dir))
    layout = read_meta(step).get("layout", {})
    if (int(layout.get("tp", 1)), int(layout.get("pp", 1))) != (tp_size, pp_size):
        raise CheckpointError(f"{step}: saved with tp={layout.get('tp')} pp={layout.get('pp')} but this run has "
                              f"tp={tp_size} pp={pp_size}; reshard it with tools/convert_checkpoint.py")
    f = model_file(step, tp_rank, 0)
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (a ZeRO-3 checkpoint keeps its weights in the optimizer files; "
                              f"consolidate it with tools/convert_checkpoint.py --format native)")
    module = safe_torch_load(f)["module"]
    empty = [k for k, v in module.items() if v.numel() == 0]
    if empty:
        raise CheckpointError(f"{f}: holds ZeRO-3 placeholders, not weights; convert it first with "
                              f"tools/convert_checkpoint.py --format native")
    own = model.state_dict()
    missing = [k for k in own if k not in module]
    if missing:
        raise CheckpointError(f"{f}: lacks {len(missing)} model tensors, e.g. {missing[:3]}")
    for k, v in own.items():
        if tuple(module[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{f}: {k} has shape {list(module[k].shape)}, the model expects {list(v.shape)}")
    model.load_state_dict({k: module[k] for k in own}, strict=True)
    return step
