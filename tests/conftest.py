"""Shared pytest configuration."""

import os

# Keep spawned ranks from oversubscribing the 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
