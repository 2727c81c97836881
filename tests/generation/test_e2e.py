"""End to end: pretrain glm-tiny with pretrain_glm.py on a few repeated sentences, then fill blanks in them
with tools/generate.py (cache on and off) and score them with tools/evaluate.py. Real training, no mocks."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.training.conftest import launch, run_tool

pytestmark = pytest.mark.slow

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "alice keeps seven green apples in a wooden basket.",
    "my uncle plays the violin every sunday evening.",
    "the red train leaves the station at noon.",
    "bob paints tiny boats with yellow stripes.",
    "our teacher drinks black coffee before class.",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~45 s: tokenizer + dataset of 600 one-sentence documents, 900 steps of the token objective."""
    d = tmp_path_factory.mktemp("memorise")
    docs = SENTENCES * 100
    random.Random(0).shuffle(docs)
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    run_tool(
        "tools/train_tokenizer.py",
        "--input",
        str(d / "corpus.jsonl"),
        "--vocab-size",
        "450",
        "--model-prefix",
        str(d / "tok"),
        "--threads",
        "1",
    )
    run_tool(
        "tools/preprocess_data.py",
        "--input",
        str(d / "corpus.jsonl"),
        "--tokenizer-model",
        str(d / "tok.model"),
        "--output-prefix",
        str(d / "data"),
        "--workers",
        "1",
    )
    launch(
        [
            "--model-size",
            "glm-tiny",
            "--seq-length",
            "32",
            "--model.max_sequence_length",
            "64",
            "--data-path",
            str(d / "data_text_document"),
            "--tokenizer-model",
            str(d / "tok.model"),
            "--lr",
            "5e-3",
            "--model.hidden_dropout",
            "0",
            "--model.attention_dropout",
            "0",
            "--bert-prob",
            "1.0",
            "--gap-sentence-prob",
            "0",
            "--train-iters",
            "900",
            "--micro-batch-size",
            "16",
            "--global-batch-size",
            "16",
            "--log-interval",
            "100",
            "--eval-interval",
            "0",
            "--data.num_workers",
            "0",
            "--save",
            str(d / "ckpt"),
        ],
        nproc=1,
    )
    return d


def test_trained_model_fills_blanks_with_the_right_words(trained: Path) -> None:
    prompts = [
        "alice keeps seven green [MASK] in a wooden basket.",
        "the red train leaves the [MASK] at noon.",
        "the quick brown fox [MASK] the lazy dog. our teacher drinks [MASK] before class.",
    ]
    expected = [SENTENCES[1], SENTENCES[3], SENTENCES[0] + " " + SENTENCES[5]]
    args = ["tools/generate.py", "--load", str(trained / "ckpt"), "--max-new-tokens", "8"]
    for p in prompts:
        args += ["--prompt", p]
    cached = run_tool(*args).stdout.splitlines()
    assert cached == expected
    assert run_tool(*args, "--no-kv-cache").stdout.splitlines() == expected
    assert run_tool(*args, "--num-beams", "3").stdout.splitlines() == expected


def test_evaluate_reports_loss_per_objective_and_cloze(trained: Path) -> None:
    cloze = trained / "cloze.jsonl"
    rows = [{"context": s.rsplit(" ", 1)[0], "target": s.rsplit(" ", 1)[1]} for s in SENTENCES]
    cloze.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_tool(
        "tools/evaluate.py", "--load", str(trained / "ckpt"), "--eval-iters", "4", "--cloze", str(cloze), "--json"
    ).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["step"] == 900
    assert result["valid"]["loss"] < 1.0 and "loss_token" in result["valid"], result
    assert result["cloze"]["count"] == len(SENTENCES) and result["cloze"]["accuracy"] >= 0.5, result


def test_tools_say_which_checkpoint_they_fall_back_to(trained: Path, tmp_path: Path) -> None:
    """``latest``'s checkpoint truncated: generate.py and evaluate.py use the previous one and say so (issue 27)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt)
    shutil.copytree(ckpt / "global_step900", ckpt / "global_step1000")  # a newer save, then cut short
    (ckpt / "latest").write_text("global_step1000")
    states = ckpt / "global_step1000" / "mp_rank_00_model_states.pt"
    os.truncate(states, states.stat().st_size // 2)
    said = [
        f"warning: skipping checkpoint global_step1000: {states}: truncated or altered",
        "warning: using checkpoint global_step900 (step 900) instead",
    ]
    gen = run_tool("tools/generate.py", "--load", str(ckpt), "--max-new-tokens", "8", "--prompt", "the red [MASK].")
    ev = run_tool("tools/evaluate.py", "--load", str(ckpt), "--eval-iters", "1", "--json")
    for proc in (gen, ev):
        lines = proc.stderr.splitlines()
        assert any(line.startswith(said[0]) for line in lines) and said[1] in lines, proc.stderr[-3000:]
        assert not any(line.startswith("warning") for line in proc.stdout.splitlines())  # results stay clean
    assert json.loads(ev.stdout.splitlines()[-1])["step"] == 900
