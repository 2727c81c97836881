"""examples/chat_lora.sh end to end: conversations built from the embedded corpus, LoRA chat fine-tuning of a tiny
GLM-4-shaped release at TP=2, the adapters merged into transformers' native layout, and transformers generating
replies from it. The held-out loss falls (the script checks it too) and the merged model loads without remote code;
the same adapters exported for peft and loaded onto the release reply identically."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.training.conftest import PY, ROOT

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "examples" / "chat_lora.sh"
STEPS = 30


def test_chat_lora_example(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "STEPS": str(STEPS), "PY": PY}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for n in range(1, 9):
        assert re.search(rf"^== \[\s*\d+s\] {n}\. ", log, re.MULTILINE), f"step {n} did not run:\n{log[-3000:]}"
    assert "chat template: the built-in GLM-4" in log and "tp 2 x pp 1" in log
    rows = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "valid_loss" in r]
    assert [r["step"] for r in evals] == [0, STEPS]
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"] - 0.5, evals
    assert f"held-out loss (assistant tokens): {evals[0]['valid_loss']:.3f} before" in log
    meta = json.loads((tmp_path / "lora" / f"global_step{STEPS}" / "meta.json").read_text())
    assert meta["lora"]["rank"] == 8
    config = json.loads((tmp_path / "merged-hf" / "config.json").read_text())
    assert config["architectures"] == ["GlmForCausalLM"] and "auto_map" not in config
    report = json.loads((tmp_path / "transformers_chat.json").read_text())
    assert report["class"] == "GlmForCausalLM" and len(report["outputs"]) == 2
    assert all(o["prompt"].endswith("<|assistant|>") and o["new_ids"] for o in report["outputs"]), report["outputs"]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    peft = json.loads((tmp_path / "peft_chat.json").read_text())
    assert peft["adapter"] and [o["new_ids"] for o in peft["outputs"]] == [o["new_ids"] for o in report["outputs"]]
    assert "peft (release + adapter) replies exactly as the merged model" in log
