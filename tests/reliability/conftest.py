"""Fixtures of the reliability suite: the data fixtures (pydoc corpus, BPE tokenizer), the training ones
(a preprocessed tiny corpus, ``launch``), and small file-system fault injectors (tmpfs mounts)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.data.conftest import glm_tokenizer, pydoc_jsonl, spm_model  # noqa: F401 - fixtures
from tests.training.conftest import tiny_corpus  # noqa: F401 - fixture


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "3m", read_only: bool = False) -> Iterator[Path]:
    """Mount a small tmpfs on ``directory`` (root only); skips the test when mounting is not permitted."""
    directory.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); needs root")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def can_mount() -> bool:
    return os.geteuid() == 0
