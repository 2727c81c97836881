"""Test helpers shared by the test suite and benchmarks."""

from megatron_glm.testing.distributed import find_free_port, run_distributed
from megatron_glm.testing.memory import peak_memory

__all__ = ["find_free_port", "peak_memory", "run_distributed"]
