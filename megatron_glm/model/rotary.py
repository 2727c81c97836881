"""Rotary position embeddings of the GLM family, computed from GLM's ``position_ids [b, 2, s]``.

- ``rope`` (GLM-130B, ChatGLM2): the first ``rotary_percent x hd`` dims of each head rotated by row 0 (the
  position); frequencies ``base^(-2i / rotated dims)``.
- ``rope_2d`` (ChatGLM-6B): the first half of each head rotated by row 0, the second half by row 1 (the block
  position), each with the frequencies of a ``hd / 2`` rotary.

Pairing: rotate-half (``x[i]`` with ``x[i + n/2]``, GLM-130B and ChatGLM-6B) or interleaved (``x[2i]`` with
``x[2i+1]``, ChatGLM2). Angles are computed and applied in fp32 (no fp16 rounding of the frequencies, as SAT),
then cast back. Queries and keys are rotated before keys enter the generation cache, so cached keys keep their
positions.
"""

from __future__ import annotations

import torch

from megatron_glm.config import ModelConfig


def inv_frequencies(dims: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """``base^(-2i / dims)`` for ``i < dims / 2`` (fp32)."""
    return 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32, device=device) / dims))


def _rotate(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate ``x [b, h, s, n]`` by ``angles [b, s, n/2]`` (fp32 maths, ``x``'s dtype out)."""
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)  # [b, 1, s, n/2]
    xf = x.float()
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = xf.chunk(2, dim=-1)
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return out.to(x.dtype)


class RotaryPositions:
    """The rotation of one forward's positions; :meth:`apply` rotates queries or keys ``[b, h, s, hd]``."""

    def __init__(self, config: ModelConfig, position_ids: torch.Tensor) -> None:
        if position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError(f"position_ids must be [b, 2, s], got {list(position_ids.shape)}")
        hd, device = config.head_dim, position_ids.device
        self.interleaved = config.rotary_interleaved
        if config.position_embedding_type == "rope_2d":
            half = hd // 2
            freq = inv_frequencies(half, config.rotary_base, device)
            self.segments = [
                (0, half, position_ids[:, 0].float().unsqueeze(-1) * freq),
                (half, hd, position_ids[:, 1].float().unsqueeze(-1) * freq),
            ]
        else:
            rotated = int(round(hd * config.rotary_percent))
            freq = inv_frequencies(rotated, config.rotary_base, device)
            self.segments = [(0, rotated, position_ids[:, 0].float().unsqueeze(-1) * freq)]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        parts, end = [], 0
        for start, end, angles in self.segments:
            parts.append(_rotate(x[..., start:end], angles, self.interleaved))
        if end < x.shape[-1]:
            parts.append(x[..., end:])
        return torch.cat(parts, dim=-1)
