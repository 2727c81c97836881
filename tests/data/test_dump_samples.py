"""tools/dump_samples.py end to end on the pydoc corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def dump(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/dump_samples.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_json_lines_and_pretty(pydoc_dataset, spm_model, tmp_path) -> None:
    common = [
        "--data-path",
        pydoc_dataset["sentence"],
        "--tokenizer-model",
        str(spm_model),
        "--seq-length",
        "64",
        "--gap-sentence-prob",
        "0.3",
        "--micro-batch-size",
        "1",
    ]
    out = dump(*common, "--num", "12")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == 12
    for r in records:
        assert r["objective"] in ("token", "sentence", "document")
        for key in ("input_ids", "labels", "loss_mask", "position_ids", "block_position_ids"):
            assert len(r[key]) == 64
        assert sum(r["loss_mask"]) > 0 and r["loss_mask"][r["sep"]] == 1
    again = dump(*common, "--num", "2", "--start", "10")
    assert [json.loads(line) for line in again.stdout.splitlines()] == records[10:]
    pretty = dump(*common, "--num", "3", "--pretty")
    assert pretty.returncode == 0, pretty.stderr
    assert pretty.stdout.count("Part A:") == 3 and "#1 (position" in pretty.stdout
    assert not any(p.name.endswith(".npy") for p in Path(pydoc_dataset["sentence"]).parent.iterdir())
    assert all("doc_ids" not in r for r in records)
    isolated = dump(*common, "--num", "12", "--reset-attention-mask")
    assert isolated.returncode == 0, isolated.stderr
    with_docs = [json.loads(line) for line in isolated.stdout.splitlines()]
    assert [{k: v for k, v in r.items() if k != "doc_ids"} for r in with_docs] == records  # same samples
    for r in with_docs:
        end_b = r["sep"] + sum(r["loss_mask"])
        assert len(r["doc_ids"]) == 64 and min(r["doc_ids"][:end_b]) == 0 and set(r["doc_ids"][end_b:]) <= {-1}


@pytest.mark.slow
def test_errors_are_one_line(spm_model, tmp_path) -> None:
    out = dump("--data-path", str(tmp_path / "missing"), "--tokenizer-model", str(spm_model))
    assert out.returncode == 2 and out.stderr.startswith("error:") and len(out.stderr.splitlines()) == 1
    out = dump("--data-path", str(tmp_path / "missing"), "--tokenizer-model", str(spm_model), "--bert-prob", "2")
    assert out.returncode == 2 and "bert_prob" in out.stderr


@pytest.mark.slow
def test_causal_samples(pydoc_dataset, spm_model) -> None:
    from megatron_glm.data.tokenizer import GLMTokenizer

    tok = GLMTokenizer(spm_model)
    common = ["--data-path", pydoc_dataset["document"], "--tokenizer-model", str(spm_model), "--seq-length", "64"]
    causal = [*common, "--bert-prob", "0", "--data.objective.causal_prob", "1", "--num", "3"]
    records = [json.loads(line) for line in dump(*causal).stdout.splitlines()]
    assert len(records) == 3
    for r in records:
        assert r["objective"] == "causal" and r["sep"] == 0 and r["input_ids"][:2] == [tok.gmask_id, tok.sop_id]
        assert r["labels"][1:3] == r["input_ids"][2:4] and set(r["block_position_ids"]) == {0}
    pretty = dump(*causal, "--pretty")
    assert pretty.returncode == 0, pretty.stderr
    assert pretty.stdout.count("causal objective") == 3 and "[gMASK][sop]" in pretty.stdout
