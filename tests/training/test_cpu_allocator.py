"""``--cpu-allocator``: ``heap`` makes a freed large tensor's pages serve the next one (no page faults), ``system``
and non-CPU devices change nothing, restoring gives glibc's behaviour (and the kept memory) back; the option parses
and the trainer applies it. Each allocator check runs in a fresh interpreter (mallopt is process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_glm.config import load_config
from megatron_glm.errors import ConfigError
from megatron_glm.training.cpu_allocator import _glibc, cpu_allocator

PROBE = """
import json, resource, sys, torch
from megatron_glm.training.cpu_allocator import cpu_allocator

torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
x = torch.randn(8192, 256)

def faults_of_a_step(i):  # a training step's pattern: gathered rows (a size that varies), forward, backward, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rows = x.index_select(0, torch.randint(0, 8192, (8192 + 64 * (i % 5),)))
    mlp(rows).square().mean().backward()
    mlp.zero_grad(set_to_none=True)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

line, restore = cpu_allocator(sys.argv[1], torch.device(sys.argv[2]))
out = {"line": line, "restorable": restore is not None, "faults": [faults_of_a_step(i) for i in range(20)]}
out["rss"] = [rss_kib()] + [rss_kib() for i in range(5) if faults_of_a_step(i) >= 0]
if restore is not None:
    restore()
    out["rss_restored"] = rss_kib()
    out["faults_restored"] = [faults_of_a_step(i) for i in range(3)]
print(json.dumps(out))
"""
STEP_PAGES = (8192 * 1024 * 4) // 4096  # 4 KiB pages of the step's largest tensor, [8192, 1024] fp32


def probe(mode: str, device: str = "cpu") -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode, device], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")


@needs_glibc
def test_heap_reuses_freed_blocks_and_restore_gives_them_back() -> None:
    heap, system = probe("heap"), probe("system")
    assert heap["line"].startswith("cpu allocator: heap") and heap["restorable"]
    assert system == {**system, "line": "", "restorable": False}
    assert heap["faults"][0] > STEP_PAGES, heap  # the first step faults its memory in
    # glibc's defaults fault in fresh pages every step; under heap later steps reuse the freed blocks' pages (the
    # heap still grows now and then while its free blocks settle: a small fraction of the faults)
    assert min(system["faults"][10:]) > STEP_PAGES, system
    assert sum(heap["faults"][10:]) < sum(system["faults"][10:]) / 4, (heap, system)
    assert max(heap["rss"]) - min(heap["rss"]) < 128 << 10, heap  # the resident set stays about where it is
    assert heap["rss"][-1] - heap["rss_restored"] > (STEP_PAGES * 4) // 2, heap  # restore: the kept memory back
    assert min(heap["faults_restored"][1:]) > STEP_PAGES // 2, heap  # glibc's defaults again: fresh pages every step


@needs_glibc
def test_non_cpu_devices_are_left_alone() -> None:
    assert probe("heap", "meta")["restorable"] is False  # only CPU runs are touched


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu allocator 'jemalloc': expected one of heap, system"):
        cpu_allocator("jemalloc", torch.device("cpu"))


def test_option_parses_and_defaults_to_heap() -> None:
    assert load_config([]).training.cpu_allocator == "heap"
    assert load_config(["--cpu-allocator", "system"]).training.cpu_allocator == "system"
    with pytest.raises(ConfigError, match="cpu_allocator"):
        load_config(["--cpu-allocator", "tcmalloc"])
