"""examples/continue_pretraining.sh end to end: a tiny GLM-4-shaped release written by transformers
(``GlmForCausalLM``, a BPE ``tokenizer.json``) is imported, trained on the embedded corpus at TP=2 (stopped
halfway and resumed) and at PP=2, exported to the native layout and loaded back by transformers without remote
code. The losses fall, the resumed run equals the straight run bitwise (losses and weights), TP=2 and PP=2 agree,
and the exported model, loaded by transformers, is better on the corpus than the release it started from."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.safe_load import safe_torch_load
from tests.training.conftest import PY, ROOT, metrics

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "examples" / "continue_pretraining.sh"
STEPS = 24


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("continue_pretraining")
    env = {**os.environ, "OUT": str(out), "STEPS": str(STEPS), "LOG_INTERVAL": "1", "CHECK_RESUME": "1", "PY": PY}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return out, log


def _losses(save: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in metrics(save).items()}


def _weights(save: Path) -> dict[str, torch.Tensor]:
    step = save / (save / "latest").read_text().strip()
    out = {}
    for path in sorted(step.glob("mp_rank_*_model_states.pt")):
        for name, t in safe_torch_load(path)["module"].items():
            out[f"{path.name}:{name}"] = t
    return out


def test_every_step_ran(example: tuple[Path, str]) -> None:
    out, log = example
    for n in range(1, 10):
        assert re.search(rf"^== \[\s*\d+s\] {n}\. ", log, re.MULTILINE), f"step {n} did not run:\n{log[-3000:]}"
    assert "6b. the same TP=2 run without the stop" in log
    meta = json.loads(next((out / "imported").glob("global_step*/meta.json")).read_text())
    assert meta["layout"]["tp"] == 2, meta["layout"]
    assert log.count(f"loaded model weights from {out / 'imported'}") == 3  # TP=2, straight TP=2, PP=2


def test_continued_pretraining_loss_falls_at_tp2_and_pp2(example: tuple[Path, str]) -> None:
    out, _ = example
    tp2, pp2 = _losses(out / "tp2"), _losses(out / "pp2")
    assert sorted(tp2) == sorted(pp2) == list(range(1, STEPS + 1))
    for losses in (tp2, pp2):
        first, last = [losses[s] for s in (1, 2, 3, 4)], [losses[s] for s in range(STEPS - 3, STEPS + 1)]
        assert sum(last) / 4 < sum(first) / 4 - 0.5, losses
    # The same imported weights and data under two layouts: the same training, up to reduction order.
    assert max(abs(tp2[s] - pp2[s]) for s in tp2) < 1e-3, (tp2, pp2)


def test_stopped_and_resumed_run_equals_the_straight_run_bitwise(example: tuple[Path, str]) -> None:
    out, log = example
    assert f"saving and stopping at step {STEPS // 2}" in log
    assert f"at step {STEPS // 2} (" in log  # the second leg resumed from the first leg's checkpoint
    resumed, straight = _losses(out / "tp2"), _losses(out / "tp2-straight")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == straight
    a, b = _weights(out / "tp2"), _weights(out / "tp2-straight")
    assert len(a) > 10 and sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_transformers_loads_the_export_without_remote_code_and_it_learned(
    example: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = example
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export, release = out / "export-hf", out / "tiny-glm-4-hf"
    report = json.loads((out / "transformers_generate.json").read_text())
    assert report["class"] == "GlmForCausalLM" and report["module"] == "transformers.models.glm.modeling_glm"
    assert all(len(o["new_ids"]) > 0 for o in report["outputs"]), report["outputs"]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "glm" and "auto_map" not in config
    assert not list(export.glob("*.py"))  # nothing to trust: no remote code shipped
    # The export carries the training: on the corpus, transformers' loss of the export is below the release's.
    tf = pytest.importorskip("transformers")
    text = json.loads((out / "pydoc.jsonl").read_text().splitlines()[3])["text"][:2000]
    losses = {}
    for name, folder in (("release", release), ("export", export)):
        tok = tf.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        model = tf.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False).eval()
        ids = tok("[gMASK]<sop>" + text, return_tensors="pt")["input_ids"][:, :128]
        with torch.no_grad():
            losses[name] = model(input_ids=ids, labels=ids).loss.item()
    assert losses["export"] < losses["release"] - 0.5, losses
