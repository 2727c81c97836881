"""The one map between dtype names (configs, flags, ``config.json``) and torch dtypes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Short names (``training.precision``, ``--dtype``) and the long names safetensors exports record."""

SHORT_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
