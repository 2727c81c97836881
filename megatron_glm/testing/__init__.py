"""Test helpers shared by the test suite and benchmarks."""

from megatron_glm.testing.distributed import find_free_port, run_distributed

__all__ = ["find_free_port", "run_distributed"]
