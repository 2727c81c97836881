"""Hostile configuration values: every one is refused by ``--dry-run`` in one line naming where it came from."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_glm.config import build_config, load_config, validate
from megatron_glm.errors import ConfigError
from tests.data.conftest import REPO_ROOT

TINY = str(REPO_ROOT / "examples" / "configs" / "glm-tiny.yaml")


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "pretrain_glm.py", "--config", TINY, *args, "--dry-run"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_learning_rate_is_invalid(value):
    proc = _dry_run("--lr", value)
    assert proc.returncode == 2
    shown = str(float(value))
    assert proc.stderr.startswith(f"error: invalid configuration: optimizer.lr must be a finite number, got {shown}")
    assert proc.stderr.count("\n") == 1


def test_every_float_field_must_be_finite():
    cfg = build_config({"optimizer.adam_eps": "inf", "model.init_std": "nan", "data.objective.mask_ratio": "-inf"})
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    for part in (
        "model.init_std must be a finite number, got nan",
        "optimizer.adam_eps must be a finite number, got inf",
        "data.objective.mask_ratio must be a finite number, got -inf",
    ):
        assert part in message


def test_bad_command_line_value_is_blamed_on_the_flag_not_the_yaml():
    proc = _dry_run("--lr", "fast")
    assert proc.returncode == 2
    assert proc.stderr == "error: command line (--lr): optimizer.lr: expected float, got 'fast'\n"
    with pytest.raises(ConfigError, match=r"^command line \(--model\.num_layers\): model\.num_layers: expected int"):
        load_config(["--config", TINY, "--model.num_layers", "two"])


def test_bad_yaml_value_is_still_blamed_on_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: optimizer\.lr: expected float, got 'fast'$"):
        load_config(["--config", str(bad)])
