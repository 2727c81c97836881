"""Reference compute peak for MFU: the device's dense datasheet peak, or a dense matmul measured on it.

MFU divides the model FLOP/s by the peak of the device in the training dtype. For a known GPU that is its
datasheet's dense tensor-core figure (:data:`PEAK_TFLOPS`, no 2:4 sparsity; fp32 training: the non-tensor
fp32 rate, since TF32 is off by default); ``--logging.peak_tflops`` overrides it; elsewhere (a CPU, an
unknown GPU) a matmul is measured, which comes out below the datasheet on a GPU and low on a shared CPU.
"""

from __future__ import annotations

import re
import time

import torch

#: ``(device-name pattern, bf16/fp16 dense TFLOP/s, fp32 TFLOP/s or None)`` per GPU, most specific first; matched
#: against ``torch.cuda.get_device_name()`` (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB").
PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    (r"\bB200\b", 2250.0, None),
    (r"\bH200 NVL\b", 835.5, 60.0),
    (r"\bH100 NVL\b", 835.5, 60.0),
    (r"\bH100 PCIe\b", 756.5, 51.2),
    (r"\bGH200\b|\bH200\b|\bH100\b|\bH800\b", 989.4, 66.9),  # SXM (HBM3 / HBM3e)
    (r"\bA100\b|\bA800\b", 312.0, 19.5),
    (r"\bL40S\b", 362.05, 91.6),
    (r"\bL40\b", 181.05, 90.5),
    (r"\bL4\b", 121.0, 30.3),
    (r"\bA10\b", 125.0, 31.2),
    (r"\bRTX A6000\b", 154.8, 38.7),
    (r"\bV100-PCIE\b", 112.0, 14.0),  # fp16 tensor cores (V100 has no bf16)
    (r"\bV100\b", 125.0, 15.7),
)


def table_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet peak FLOP/s of the GPU named ``device_name`` in ``dtype`` (``None``: not in the table)."""
    for pattern, half, single in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            peak = single if dtype == torch.float32 else half
            return None if peak is None else peak * 1e12
    return None


def matmul_peak_flops(
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    n: int = 2048,
    seconds: float = 1.0,
    calls: int = 0,
) -> float:
    """Best FLOP/s of an ``n x n x n`` matmul over about ``seconds``, timed ``calls`` matmuls at a time (a CUDA
    device: 20, with one synchronise per batch, so launches overlap as in training; a CPU: 1), after a warm-up
    batch (kernel choice, clocks)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    calls = calls or (20 if cuda else 1)
    a = torch.randn(n, n, dtype=torch.float32, device=device).to(dtype)
    b = torch.randn(n, n, dtype=torch.float32, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def batch() -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b, out=out)
        sync()
        return calls * 2.0 * n**3 / (time.perf_counter() - t0)

    batch()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        best = max(best, batch())
    return best


def device_peak_flops(dtype: torch.dtype, device: torch.device, override_tflops: float = 0.0) -> tuple[float, str]:
    """``(peak FLOP/s of this device, where it comes from)``: ``override_tflops`` when set, else the
    datasheet table for a known GPU, else a measured matmul (8192^3 on a GPU, 1024^3 on a CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "--logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak_flops(name, dtype)
        if peak is not None:
            return peak, f"datasheet of the {name}"
        return matmul_peak_flops(dtype, device, n=8192, seconds=1.0), f"a matmul measured on the {name}"
    return matmul_peak_flops(dtype, device, n=1024, seconds=0.3), f"a matmul measured on the {device.type}"
