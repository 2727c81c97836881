"""Task files: every malformed line is one error naming the file and line; rows follow the GLM layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.errors import DataError
from megatron_glm.finetune.config import FinetuneConfig, split_arguments
from megatron_glm.finetune.encode import (
    ROW_ANSWER,
    ROW_PAD,
    ROW_TASK,
    TaskDataset,
    TaskEncoder,
    collate_rows,
    encode_examples,
    task_batches,
)
from megatron_glm.finetune.tasks import read_task_file
from tests.finetune.helpers import WordTokenizer
from tests.generation.helpers import GMASK, MASK, TOKENS

GOOD_CLOZE = {"text": "a b [MASK] c", "choices": ["x", "y z"], "label": 1}
GOOD_S2S = {"source": "one two three", "target": "four five"}


def _file(tmp_path: Path, rows: list, name: str = "task.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("task", "bad", "message"),
    [
        ("cloze", {"choices": ["x", "y"], "label": 0}, "missing field 'text'"),
        ("cloze", {"text": "a [MASK]", "label": 0}, "missing field 'choices'"),
        ("cloze", {"text": "a [MASK]", "choices": ["x", "y"]}, "missing field 'label'"),
        (
            "cloze",
            {"text": "a [MASK]", "choices": ["x", "y"], "label": 2},
            "label 2 is out of range for 2 choices (0..1)",
        ),
        (
            "cloze",
            {"text": "a [MASK]", "choices": ["x", "y"], "label": -1},
            "label -1 is out of range for 2 choices (0..1)",
        ),
        (
            "cloze",
            {"text": "no blank here", "choices": ["x", "y"], "label": 0},
            "field 'text' must contain exactly one [MASK], found 0",
        ),
        (
            "cloze",
            {"text": "a [MASK]", "choices": ["x"], "label": 0},
            "field 'choices' must be a list of at least two non-empty strings",
        ),
        (
            "cloze",
            {"text": "a [MASK]", "choices": ["x", "y"], "label": "0"},
            "field 'label' must be an integer index into 'choices', got '0'",
        ),
        ("seq2seq", {"source": "a"}, "missing field 'target'"),
        ("seq2seq", {"target": "a"}, "missing field 'source'"),
        ("seq2seq", {"source": 3, "target": "a"}, "field 'source' must be a string, got int"),
        ("seq2seq", "{not json", "not valid JSON"),
        ("seq2seq", "[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, task: str, bad: object, message: str) -> None:
    good = GOOD_CLOZE if task == "cloze" else GOOD_S2S
    path = _file(tmp_path, [good, "", bad, good])  # a blank line is skipped but counted: the bad line is 3
    with pytest.raises(DataError) as info:
        read_task_file(path, task)
    text = str(info.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text, text


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read the cloze file"):
        read_task_file(tmp_path / "nope.jsonl", "cloze")
    with pytest.raises(DataError, match="no seq2seq examples"):
        read_task_file(_file(tmp_path, [""]), "seq2seq")


def test_source_longer_than_limit_is_a_line_numbered_error_or_truncated(tmp_path: Path) -> None:
    path = _file(tmp_path, [GOOD_S2S, {"source": "w " * 9 + "[MASK] end", "target": "t"}])
    examples = read_task_file(path, "seq2seq")
    tok = WordTokenizer()
    strict = TaskEncoder(tok, FinetuneConfig(task="seq2seq", source_length=6, target_length=4), str(path))
    with pytest.raises(DataError) as info:
        encode_examples(strict, examples, "seq2seq")
    assert str(info.value) == (
        f"{path}:2: source has 11 tokens, more than --source-length 6 (raise it or pass --source-truncation left/right)"
    )
    for rule, kept in (("left", ["w", "w", "w", "w", "[MASK]", "end"]), ("right", ["w"] * 5 + ["[MASK]"])):
        enc = TaskEncoder(
            tok, FinetuneConfig(task="seq2seq", source_length=6, target_length=4, source_truncation=rule), str(path)
        )
        a = enc.part_a(examples[1].source, 2)
        assert a == [TOKENS.cls, *tok.encode(" ".join(kept))] and MASK in a and len(a) <= 6 + 2, (rule, a)
    cloze = _file(tmp_path, [{"text": "a [MASK]", "choices": ["x", "y y y y y"], "label": 0}], "c.jsonl")
    enc = TaskEncoder(tok, FinetuneConfig(task="cloze", source_length=6, target_length=4), str(cloze))
    with pytest.raises(DataError, match=rf"^{cloze}:1: choice 1 has 5 tokens, more than --target-length 4$"):
        encode_examples(enc, read_task_file(cloze, "cloze"), "cloze", 2)


def test_seq2seq_row_layout() -> None:
    tok = WordTokenizer()
    cfg = FinetuneConfig(task="seq2seq", source_length=5, target_length=3)
    enc = TaskEncoder(tok, cfg)
    src, tgt = tok.encode("one two three"), tok.encode("four five six seven")
    (row,) = enc.seq2seq(read_examples("seq2seq", source="one two three", target="four five six seven")[0])
    n = 5  # [CLS] one two three [gMASK]
    assert row["input_ids"][:n].tolist() == [TOKENS.cls, *src, GMASK] and int(row["sep"]) == n
    assert row["input_ids"][n : n + 4].tolist() == [TOKENS.sop, *tgt[:3]]  # target cut to 3, then [eop]
    assert row["labels"][n : n + 4].tolist() == [*tgt[:3], TOKENS.eop]
    assert row["loss_mask"].tolist() == [0] * n + [1] * 4 + [0] * (cfg.seq_length - n - 4)
    assert row["position_ids"][0, n : n + 4].tolist() == [n - 1] * 4  # the [gMASK]'s position
    assert row["position_ids"][1].tolist() == [0] * n + [1, 2, 3, 4] + [0] * (cfg.seq_length - n - 4)
    assert len(row["input_ids"]) == cfg.seq_length == 5 + 3 + 3


def read_examples(task: str, **row: object) -> list:
    from megatron_glm.finetune.tasks import READERS

    return [READERS[task](row, "x", 1)]


def test_cloze_rows_pad_choices_and_mark_the_answer() -> None:
    tok = WordTokenizer()
    cfg = FinetuneConfig(task="cloze", source_length=6, target_length=3)
    ex = read_examples("cloze", text="a b [MASK] c", choices=["x", "y z"], label=1)[0]
    rows = TaskEncoder(tok, cfg).cloze(ex, 3)
    assert [int(r["objective"]) for r in rows] == [ROW_TASK, ROW_ANSWER, ROW_PAD]
    n = 5  # [CLS] a b [MASK] c
    assert rows[1]["input_ids"][: n + 2].tolist() == [
        TOKENS.cls,
        *tok.encode("a b"),
        MASK,
        *tok.encode("c"),
        TOKENS.sop,
        tok.encode("y")[0],
    ]
    assert rows[1]["labels"][n : n + 2].tolist() == tok.encode("y z") and rows[1]["loss_mask"].sum() == 2
    assert rows[1]["position_ids"][0, n : n + 2].tolist() == [3, 3]
    assert rows[2]["loss_mask"].sum() == 0


def test_training_order_is_resumable_and_covers_each_epoch() -> None:
    encoded = [
        {
            "input_ids": np.full((1, 4), i),
            "labels": np.zeros((1, 4), np.int64),
            "loss_mask": np.zeros((1, 4), np.float32),
            "position_ids": np.zeros((1, 2, 4), np.int64),
            "sep": np.ones(1, np.int64),
            "objective": np.full(1, ROW_TASK),
        }
        for i in range(7)
    ]
    ds = TaskDataset(encoded, rows_per_example=1, seq_length=4, pad=0, shuffle=True, seed=3)
    seen = [
        int(b["input_ids"][j, 0])
        for b in _take(task_batches(ds, consumed_samples=0, micro_batch_size=2), 7)
        for j in range(2)
    ]
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))
    resumed = [
        int(b["input_ids"][j, 0])
        for b in _take(task_batches(ds, consumed_samples=6, micro_batch_size=2), 4)
        for j in range(2)
    ]
    assert resumed == seen[6:14]
    valid = TaskDataset(encoded, rows_per_example=1, seq_length=4, pad=0, shuffle=False)
    batch = collate_rows([valid[5], valid[6], valid[7]])
    assert batch["input_ids"][:, 0].tolist() == [5, 6, 0] and batch["objective"].tolist() == [
        ROW_TASK,
        ROW_TASK,
        ROW_PAD,
    ]


def _take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def test_task_options_split_from_pretraining_flags() -> None:
    task, rest = split_arguments(
        [
            "--task",
            "cloze",
            "--train-data",
            "t.jsonl",
            "--lr",
            "1e-4",
            "--source-length",
            "40",
            "--micro-batch-size",
            "2",
        ]
    )
    assert (task.task, task.train_data, task.source_length) == ("cloze", "t.jsonl", 40)
    assert rest == ["--lr", "1e-4", "--micro-batch-size", "2"]
