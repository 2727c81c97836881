"""``--deterministic``: the kernels a bitwise resume needs on CUDA (CPU kernels already are).

On CUDA several kernels accumulate with atomics in an order that varies from run to run: cuBLAS with its
default workspace, the embedding and ``index_add`` backward, and SDPA's memory-efficient backward (the kernel
our boolean attention mask selects), which splits the keys over thread blocks. With
``torch.use_deterministic_algorithms(True)`` torch takes the deterministic implementation of each (SDPA:
one key split in the memory-efficient backward, the deterministic flash backward, cuDNN attention not
chosen) and raises on an operation that has none; cuBLAS additionally needs ``CUBLAS_WORKSPACE_CONFIG``
set before its first handle is made. The cost is speed (attention backward most), measured by
``benchmarks/gpu_smoke.sh``.
"""

from __future__ import annotations

import os

import torch

#: The cuBLAS setting that makes its results reproducible (NVIDIA's cuBLAS docs, "Results reproducibility").
CUBLAS_WORKSPACE = ":4096:8"


def apply_determinism(enabled: bool) -> None:
    """Turn deterministic kernels on for this process (nothing when ``enabled`` is false). Call it before the
    first CUDA matmul: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it creates its handle."""
    if not enabled:
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
