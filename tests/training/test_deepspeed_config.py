"""The DeepSpeed config derived from ours, and clear errors when a JSON disagrees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_glm.config import load_config
from megatron_glm.errors import ConfigError
from megatron_glm.training.deepspeed_config import batch_sizes, build_deepspeed_config

ROOT = Path(__file__).resolve().parents[2]


def test_flags_only_derives_zero1() -> None:
    cfg = load_config(["--micro-batch-size", "2", "--global-batch-size", "16", "--clip-grad", "0.5"])
    ds = build_deepspeed_config(cfg, dp_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] is False
    assert batch_sizes(load_config(["--micro-batch-size", "3", "--gradient-accumulation-steps", "2"]), 2) == (3, 2, 12)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_shipped_configs_fill_in(name: str) -> None:
    data = json.loads((ROOT / "ds_configs" / name).read_text())
    precision = (
        "bf16" if data.get("bf16", {}).get("enabled") else "fp16" if data.get("fp16", {}).get("enabled") else "fp32"
    )
    args = ["--deepspeed_config", str(ROOT / "ds_configs" / name), "--micro-batch-size", "2"]
    if precision != "fp32":
        args.append(f"--{precision}")
    ds = build_deepspeed_config(load_config(args), dp_size=2)
    assert ds["train_batch_size"] == 4
    assert ds["zero_optimization"]["stage"] == data["zero_optimization"]["stage"]


def test_mismatches_are_clear_errors(tmp_path: Path) -> None:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(
        ConfigError,
        match=r"ds.json: train_micro_batch_size_per_gpu is 8 but "
        r"training.micro_batch_size gives 4",
    ):
        build_deepspeed_config(load_config(["--deepspeed_config", str(p)]), 1)
    p.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"bf16.enabled is True but training.precision is 'fp32'; pass --bf16"):
        build_deepspeed_config(load_config(["--deepspeed_config", str(p)]), 1)
    p.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        build_deepspeed_config(load_config(["--deepspeed_config", str(p)]), 1)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="ds.json: not valid JSON"):
        build_deepspeed_config(load_config(["--deepspeed_config", str(p)]), 1)
    with pytest.raises(ConfigError, match="deepspeed config not found"):
        build_deepspeed_config(load_config(["--deepspeed_config", str(tmp_path / "nope.json")]), 1)
    cfg = load_config(
        ["--deepspeed_config", str(ROOT / "ds_configs" / "zero2.json"), "--pipeline-model-parallel-size", "2"]
    )
    with pytest.raises(ConfigError, match="ZeRO stage 2 cannot be used with pipeline parallelism"):
        build_deepspeed_config(cfg, 1)
