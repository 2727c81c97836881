"""Every float field of the config must be a finite number (``--lr nan`` or ``inf`` is never valid)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any


def nonfinite_fields(cfg: Any, prefix: str = "") -> list[str]:
    """One message per float field of ``cfg`` (a config dataclass, walked recursively) that is NaN or infinite."""
    out: list[str] = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.extend(nonfinite_fields(value, f"{path}."))
        elif hints.get(f.name) is float and isinstance(value, float) and not math.isfinite(value):
            out.append(f"{path} must be a finite number, got {value}")
    return out
