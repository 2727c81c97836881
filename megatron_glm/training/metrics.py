"""Training metrics to the console, ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key in ("lr",) or (value and abs(value) < 1e-3):
            return f"{key} {value:.3e}"
        return f"{key} {value:.4g}" if abs(value) >= 100 else f"{key} {value:.4f}"
    return f"{key} {value}"


class MetricsLogger:
    """Writes only on the logging rank (``enabled``); the other ranks get a no-op logger."""

    def __init__(self, save_dir: str = "", tensorboard_dir: str = "", enabled: bool = True) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(save_dir) / "metrics.jsonl"
            self.jsonl = self.path.open("a", encoding="utf-8")
        tb_dir = tensorboard_dir or (str(Path(save_dir) / "tensorboard") if save_dir else "")
        if tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tb_dir)
            except ImportError:  # tensorboard is optional
                self.tb = None

    def rewind(self, step: int) -> None:
        """Forget lines logged after ``step`` (a resumed run logs those steps again)."""
        if not self.enabled or self.jsonl is None:
            return
        self.jsonl.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(self.path)
        self.jsonl = self.path.open("a", encoding="utf-8")

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """Record one step's values (floats, ints, strings)."""
        if not self.enabled:
            return
        shown = "  ".join(_fmt(k, v) for k, v in values.items())
        print(f"{prefix}step {step:>6}  {shown}", flush=True)
        if self.jsonl is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
            self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
