"""finetune_glm.py end to end: TP=2 and PP=2 reproduce TP=1 (fp32), resume is exact, errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.finetune.conftest import finetune, read_metrics
from tests.training.conftest import run_tool

pytestmark = pytest.mark.slow


def _args(setup: dict, task: str, save: Path, *extra: str) -> list[str]:
    files = {"cloze": "next_sentence", "seq2seq": "continue"}[task]
    return [
        "--task",
        task,
        "--train-data",
        str(setup["tasks"] / f"{files}_train.jsonl"),
        "--valid-data",
        str(setup["tasks"] / f"{files}_valid.jsonl"),
        "--load",
        str(setup["base"]),
        "--save",
        str(save),
        "--source-length",
        "40",
        "--target-length",
        "40",
        "--source-truncation",
        "left",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--lr",
        "2e-3",
        "--lr-decay-iters",
        "6",
        "--model.hidden_dropout",
        "0",
        "--model.attention_dropout",
        "0",
        "--log-interval",
        "1",
        "--eval-interval",
        "3",
        "--num-beams",
        "2",
        *extra,
    ]


def _losses(save: Path) -> list[float]:
    train, _ = read_metrics(save)
    return [train[s]["loss"] for s in sorted(train)]


def test_cloze_tp2_pp2_match_tp1_and_resume_is_exact(finetune_setup: dict, tmp_path: Path) -> None:
    s = finetune_setup
    finetune(_args(s, "cloze", tmp_path / "tp1", "--train-iters", "6"))
    finetune(_args(s, "cloze", tmp_path / "tp2", "--train-iters", "6", "--tensor-model-parallel-size", "2"), nproc=2)
    finetune(_args(s, "cloze", tmp_path / "pp2", "--train-iters", "6", "--pipeline-model-parallel-size", "2"), nproc=2)
    tp1, tp2, pp2 = (_losses(tmp_path / n) for n in ("tp1", "tp2", "pp2"))
    assert len(tp1) == 6
    assert max(abs(a - b) for a, b in zip(tp1, tp2)) < 1e-5, (tp1, tp2)
    assert max(abs(a - b) for a, b in zip(tp1, pp2)) < 1e-5, (tp1, pp2)
    evals = [read_metrics(tmp_path / n)[1] for n in ("tp1", "tp2", "pp2")]
    assert sorted(evals[0]) == [3, 6]
    for e in evals[1:]:
        for step in (3, 6):
            assert abs(e[step]["valid_loss"] - evals[0][step]["valid_loss"]) < 1e-5
            assert e[step]["accuracy"] == evals[0][step]["accuracy"] and e[step]["count"] == 8
    # Resume: stop after 3 steps, run the same command for 6: the same losses, bit for bit.
    save = tmp_path / "resumed"
    finetune(_args(s, "cloze", save, "--train-iters", "3"))
    out = finetune(_args(s, "cloze", save, "--train-iters", "6"))
    assert "resumed from" in out.stdout
    assert _losses(save) == tp1
    # tools/evaluate.py on the fine-tuned checkpoint reproduces the run's last evaluation.
    report = tmp_path / "r.json"
    run_tool(
        "tools/evaluate.py",
        "--task",
        "cloze",
        "--valid-data",
        str(s["tasks"] / "next_sentence_valid.jsonl"),
        "--load",
        str(tmp_path / "tp1"),
        "--source-length",
        "40",
        "--target-length",
        "40",
        "--source-truncation",
        "left",
        "--output",
        str(report),
    )
    got = json.loads(report.read_text())
    assert got["step"] == 6 and got["count"] == 8 and got["accuracy"] == evals[0][6]["accuracy"]
    assert abs(got["valid_loss"] - evals[0][6]["valid_loss"]) < 1e-5


def test_seq2seq_pipeline_matches_and_reports_generation_metrics(finetune_setup: dict, tmp_path: Path) -> None:
    s = finetune_setup
    smooth = ("--label-smoothing", "0.1", "--no-repeat-ngram-size", "2", "--train-iters", "3")
    finetune(_args(s, "seq2seq", tmp_path / "tp1", *smooth))
    finetune(_args(s, "seq2seq", tmp_path / "pp2", *smooth, "--pipeline-model-parallel-size", "2"), nproc=2)
    tp1, pp2 = _losses(tmp_path / "tp1"), _losses(tmp_path / "pp2")
    assert len(tp1) == 3 and max(abs(a - b) for a, b in zip(tp1, pp2)) < 1e-5, (tp1, pp2)
    _, evals = read_metrics(tmp_path / "tp1")
    row = evals[3]
    assert {"valid_loss", "rouge1", "rouge2", "rougeL", "bleu"} <= set(row) and row["count"] == 8
    assert 0 <= row["rougeL"] <= 100
    _, pp_evals = read_metrics(tmp_path / "pp2")
    assert abs(pp_evals[3]["valid_loss"] - row["valid_loss"]) < 1e-5
    # The same generation metrics from tools/evaluate.py on the saved checkpoint; and a perplexity report.
    report = tmp_path / "r.json"
    run_tool(
        "tools/evaluate.py",
        "--task",
        "seq2seq",
        "--valid-data",
        str(s["tasks"] / "continue_valid.jsonl"),
        "--load",
        str(tmp_path / "tp1"),
        "--source-length",
        "40",
        "--target-length",
        "40",
        "--source-truncation",
        "left",
        "--num-beams",
        "2",
        "--no-repeat-ngram-size",
        "2",
        "--output",
        str(report),
    )
    got = json.loads(report.read_text())
    for key in ("rouge1", "rouge2", "rougeL", "bleu"):
        assert abs(got[key] - row[key]) < 1e-9, (key, got, row)
    text = tmp_path / "raw.txt"
    text.write_text(
        " ".join(
            json.loads(line)["target"] for line in (s["tasks"] / "continue_train.jsonl").read_text().splitlines()[:20]
        )
    )
    run_tool(
        "tools/evaluate.py",
        "--task",
        "ppl",
        "--valid-data",
        str(text),
        "--load",
        str(tmp_path / "tp1"),
        "--window",
        "64",
        "--overlap",
        "16",
        "--output",
        str(report),
    )
    ppl = json.loads(report.read_text())
    assert ppl["words"] == len(text.read_text().split()) and ppl["ppl_word"] > ppl["ppl_token"] > 1


def test_malformed_task_file_is_one_line_error(finetune_setup: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "a [MASK]", "choices": ["x", "y"], "label": 0}\n{"text": "a", "choices": ["x", "y"], "label": 0}\n'
    )
    args = _args(finetune_setup, "cloze", tmp_path / "bad", "--train-iters", "1")
    args[args.index("--train-data") + 1] = str(bad)
    proc = finetune(args, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert lines == [f"error: {bad}:2: field 'text' must contain exactly one [MASK], found 0"], proc.stderr
