"""Learning-rate schedule: linear warmup, then linear / cosine / constant decay to a floor, clamped.

Unlike the original GLM code, the decayed rate never goes below ``min_lr`` (or negative) past the decay
horizon. The schedule is a pure function of the step, so resuming only needs the step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megatron_glm.config import OptimizerConfig


@dataclass(frozen=True)
class LRSchedule:
    """``lr(step)`` for step = number of optimizer steps already taken."""

    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    style: str = "cosine"

    @classmethod
    def from_config(cls, cfg: OptimizerConfig, train_iters: int) -> LRSchedule:
        decay = cfg.lr_decay_iters or train_iters
        warmup = cfg.lr_warmup_iters or int(round(cfg.lr_warmup_fraction * decay))
        return cls(cfg.lr, cfg.min_lr, warmup, max(decay, 1), cfg.lr_decay_style)

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if self.style == "constant":
            return self.max_lr
        span = max(self.decay_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        if self.style == "linear":
            factor = 1.0 - progress
        elif self.style == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown lr_decay_style {self.style!r}")
        return self.min_lr + (self.max_lr - self.min_lr) * factor


class LRScheduler:
    """Applies an :class:`LRSchedule` to an optimizer's param groups; resumable via ``state_dict``."""

    def __init__(self, optimizer: Any, schedule: LRSchedule, step: int = 0) -> None:
        self.optimizer, self.schedule, self.num_steps = optimizer, schedule, step
        self._apply()

    def _apply(self) -> None:
        lr = self.schedule(self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        """Advance one optimizer step (call after ``optimizer.step()``)."""
        self.num_steps += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "schedule": self.schedule.__dict__.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()
