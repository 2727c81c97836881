"""End to end with a byte-level BPE tokenizer.json instead of sentencepiece: train the tokenizer
(tools/train_tokenizer.py --type bpe), preprocess, pretrain glm-tiny a few steps, generate and evaluate."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megatron_glm.data.indexed_dataset import IndexedDataset
from megatron_glm.data.tokenizer import open_tokenizer
from tests.training.conftest import launch, metrics, run_tool

pytestmark = pytest.mark.slow

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "alice keeps seven green apples in a wooden basket.",
    "my uncle plays the violin every sunday evening.",
    "the red train leaves the station at noon.",
]


def test_pretrain_generate_and_evaluate_with_a_tokenizer_json(tmp_path: Path) -> None:
    docs = SENTENCES * 50
    random.Random(0).shuffle(docs)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    corpus = str(tmp_path / "corpus.jsonl")
    run_tool(
        "tools/train_tokenizer.py", "--type", "bpe", "--input", corpus, "--vocab-size", "300", "--model-prefix",
        str(tmp_path / "tok"),
    )  # fmt: skip
    # A folder holding tokenizer.json, as a GLM-4 release ships it.
    (tmp_path / "release").mkdir()
    (tmp_path / "tok.json").rename(tmp_path / "release" / "tokenizer.json")
    tokenizer = str(tmp_path / "release")
    run_tool(
        "tools/preprocess_data.py", "--input", corpus, "--tokenizer-model", tokenizer, "--output-prefix",
        str(tmp_path / "data"), "--workers", "2", "--chunk-mb", "0.002",
    )  # fmt: skip
    tok = open_tokenizer(tokenizer)
    ds = IndexedDataset(str(tmp_path / "data_text_document"))
    assert [tok.decode(ds.document(k)[0]) for k in range(3)] == docs[:3]
    save = tmp_path / "ckpt"
    launch(
        [
            "--model-size", "glm-tiny", "--seq-length", "32", "--model.max_sequence_length", "64",
            "--data-path", str(tmp_path / "data_text_document"), "--tokenizer-model", tokenizer,
            "--lr", "5e-3", "--model.hidden_dropout", "0", "--model.attention_dropout", "0",
            "--bert-prob", "1.0", "--gap-sentence-prob", "0", "--train-iters", "60",
            "--micro-batch-size", "8", "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "0",
            "--data.num_workers", "1", "--save", str(save),
        ],
        nproc=1,
    )  # fmt: skip
    losses = [row["loss"] for _, row in sorted(metrics(save).items())]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10, losses
    # Generation reads the tokenizer recorded in the checkpoint: the blank is filled, the rest kept.
    prompt = "alice keeps seven green [MASK] in a wooden basket."
    out = run_tool("tools/generate.py", "--load", str(save), "--max-new-tokens", "6", "--prompt", prompt)
    (line,) = out.stdout.splitlines()
    assert line.startswith("alice keeps seven green ") and line.endswith(" in a wooden basket."), line
    assert "[MASK]" not in line
    result = run_tool("tools/evaluate.py", "--load", str(save), "--eval-iters", "2", "--json").stdout
    assert json.loads(result.splitlines()[-1])["valid"]["loss"] < losses[0]
