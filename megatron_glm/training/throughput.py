"""Reference compute peak for MFU: a dense matmul measured on this device, in the training dtype."""

from __future__ import annotations

import time

import torch


def matmul_peak_flops(
    dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", n: int = 2048, seconds: float = 1.0
) -> float:
    """Best FLOP/s of an ``n x n x n`` matmul over about ``seconds`` of repeats (after a warm-up)."""
    device = torch.device(device)
    a = torch.randn(n, n, dtype=torch.float32, device=device).to(dtype)
    b = torch.randn(n, n, dtype=torch.float32, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best
