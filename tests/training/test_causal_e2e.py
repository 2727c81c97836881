"""End to end with the causal objective only and a GLM-4 style tokenizer.json without [CLS]: preprocess, pretrain
glm-tiny through pretrain_glm.py with packed, isolated documents; the loss falls and is logged as loss_causal."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.training.conftest import launch, metrics, run_tool
from tests.training.test_tokenizer_json_e2e import SENTENCES

pytestmark = pytest.mark.slow


def test_causal_pretraining_with_a_tokenizer_without_cls(tmp_path: Path) -> None:
    docs = SENTENCES * 50
    random.Random(1).shuffle(docs)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    run_tool(
        "tools/train_tokenizer.py", "--type", "bpe", "--input", str(corpus), "--vocab-size", "300",
        "--model-prefix", str(tmp_path / "tok"),
    )  # fmt: skip
    data = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[CLS]"]  # GLM-4 has none
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tokenizer = str(tmp_path / "release")
    run_tool(
        "tools/preprocess_data.py", "--input", str(corpus), "--tokenizer-model", tokenizer, "--output-prefix",
        str(tmp_path / "data"), "--workers", "1",
    )  # fmt: skip
    save = tmp_path / "ckpt"
    common = [
        "--model-size", "glm-tiny", "--seq-length", "48", "--data-path", str(tmp_path / "data_text_document"),
        "--tokenizer-model", tokenizer, "--lr", "5e-3", "--model.hidden_dropout", "0",
        "--model.attention_dropout", "0", "--train-iters", "40", "--micro-batch-size", "8",
        "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "0", "--data.num_workers", "0",
        "--reset-attention-mask",
    ]  # fmt: skip
    blank = launch([*common, "--save", str(tmp_path / "blank")], nproc=1, launcher="python", check=False)
    assert blank.returncode == 2 and "the tokenizer has no [CLS] token" in blank.stderr, blank.stderr[-2000:]
    assert "Traceback" not in blank.stderr
    causal = ["--bert-prob", "0", "--gap-sentence-prob", "0", "--data.objective.causal_prob", "1"]
    launch([*common, *causal, "--save", str(save)], nproc=1)
    rows = [row for _, row in sorted(metrics(save).items())]
    losses = [row["loss"] for row in rows]
    assert len(losses) == 40 and all(abs(row["loss_causal"] - row["loss"]) < 1e-5 for row in rows)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
