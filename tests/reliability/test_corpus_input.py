"""Hostile and broken corpora: each gives one clear line, and nothing appears under the final output names."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.data.indexed_dataset import IndexedDataset
from megatron_glm.data.preprocess import PreprocessConfig, preprocess
from megatron_glm.data.sources import iter_texts
from megatron_glm.data.tokenizer_training import train_sentencepiece
from megatron_glm.errors import DataError
from tests.data.conftest import REPO_ROOT
from tests.reliability.conftest import tmpfs


def _run(tmp_path: Path, inputs: list[Path], spm_model: Path, name: str = "out", **kwargs):
    config = PreprocessConfig(
        inputs=[str(p) for p in inputs], output_prefix=str(tmp_path / name), tokenizer_model=str(spm_model), **kwargs
    )
    return preprocess(config, log=lambda _line: None)


def _outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".bin", ".idx", ".meta.json", ".shards")))


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/preprocess_data.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_non_utf8_corpus_fails_with_one_summary_line(tmp_path, spm_model):
    """Latin-1 bytes where UTF-8 was expected (most lines bad): an error above the threshold, nothing written."""
    corpus = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"text": f"caf\u00e9 number {i}"}, ensure_ascii=False).encode("latin-1") for i in range(30)]
    corpus.write_bytes(b"\n".join([*lines[:28], b'{"text": "fine one"}', b'{"text": "fine two"}']) + b"\n")
    proc = _tool("--input", str(corpus), "--tokenizer-model", str(spm_model), "--output-prefix", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        "error: 28 of 30 non-blank records are bad (93.3%: 28 invalid_utf8), above --max-bad-fraction 0.5; first: "
    )
    assert "latin1.jsonl:1: invalid UTF-8 at byte" in proc.stderr and "nothing was written" in proc.stderr
    assert _outputs(tmp_path) == []
    # Consent through the threshold: the two good documents are written, the report says how much was bad.
    summary = _run(tmp_path, [corpus], spm_model, max_bad_fraction=1.0)
    assert summary.documents == 2 and summary.skipped == {"invalid_utf8": 28}
    assert "skipped 28 bad line(s) of 30 (93.3% of the non-blank ones): 28 invalid_utf8" in summary.report()


def test_malformed_json_below_the_threshold_is_skipped_and_located(tmp_path, spm_model):
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text(
        '{"text": "one"}\n{"text": broken\n[1, 2]\n{"txt": "x"}\n{"text": 5}\n'
        + "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5))
    )
    summary = _run(tmp_path, [corpus], spm_model)
    assert summary.documents == 6
    assert summary.skipped == {"invalid_json": 2, "missing_key": 1, "not_a_string": 1}
    assert [str(p) for p in summary.problems][:2] == [
        f"{corpus}:2: invalid JSON (Expecting value at column 10)",
        f"{corpus}:3: expected a JSON object, got list",
    ]


def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path, spm_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    for path in (empty, blank):
        with pytest.raises(
            DataError,
            match=rf"^no usable document in {path}: \d+ line\(s\), no records; nothing "
            "was written$",
        ):
            _run(tmp_path, [path], spm_model)
    assert _outputs(tmp_path) == []


def test_gzip_corpus_is_read_not_reported_as_invalid_utf8(tmp_path, spm_model, glm_tokenizer):
    """The original defect: a .jsonl.gz was read as raw bytes, every line 'invalid UTF-8', and written anyway."""
    texts = [f"Document {i}: some words to tokenize." for i in range(40)]
    plain = tmp_path / "c.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    summary = _run(tmp_path, [packed], spm_model, "gz")
    assert summary.skipped == {} and summary.documents == 40
    ds = IndexedDataset(summary.outputs["text"])
    assert [glm_tokenizer.decode(ds[i]) for i in range(len(ds))] == texts
    # Garbage named .gz: one line naming the file, nothing written.
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text('{"text": "not compressed"}\n')
    with pytest.raises(DataError, match=r"fake\.jsonl\.gz: the name says gzip but the content is plain text"):
        _run(tmp_path, [fake], spm_model, "fake")
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(packed.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot decompress \(gzip\): .*truncated or corrupt"):
        _run(tmp_path, [truncated], spm_model, "cut")
    assert not any(n.startswith(("fake", "cut")) for n in _outputs(tmp_path))


def test_lone_surrogate_is_reported_and_skipped(tmp_path, spm_model):
    corpus = tmp_path / "sur.jsonl"
    corpus.write_text(
        '{"text": "\\ud800"}\n{"text": "ok \\ud83d\\ude00 pair"}\n{"text": "x\\udfff y"}\n'
        '{"text": "plain"}\n{"text": "more"}\n'
    )
    summary = _run(tmp_path, [corpus], spm_model)
    assert summary.documents == 3 and summary.skipped == {"invalid_unicode": 2}
    assert str(summary.problems[0]) == (
        f"{corpus}:1: key 'text' holds a lone surrogate escape (\\ud800-\\udfff), which is no character"
    )
    # The tokenizer trainer reads through the same judge: it trains on the good lines instead of failing.
    assert list(iter_texts([str(corpus)])) == ["ok \U0001f600 pair", "plain", "more"]
    with (tmp_path / "sur.jsonl").open("a") as out:
        out.writelines(json.dumps({"text": f"word{i} and more words {i * 7}"}) + "\n" for i in range(300))
    train_sentencepiece([str(corpus)], str(tmp_path / "tok"), 300, model_type="bpe", num_threads=1)
    assert (tmp_path / "tok.model").is_file()


def test_read_only_output_directory(tmp_path, pydoc_jsonl, spm_model):
    out = tmp_path / "ro"
    out.mkdir()
    with tmpfs(out, size="1m", read_only=True):
        proc = _tool(
            "--input", str(pydoc_jsonl), "--tokenizer-model", str(spm_model), "--output-prefix", str(out / "p")
        )
    assert proc.returncode == 2
    assert proc.stderr == f"error: --output-prefix {out / 'p'}: directory {out} is not writable\n"


def test_full_output_disk_is_one_line_and_leaves_nothing(tmp_path, pydoc_jsonl, spm_model):
    out = tmp_path / "full"
    with tmpfs(out, size="256k"):
        proc = _tool(
            "--input", str(pydoc_jsonl), "--tokenizer-model", str(spm_model), "--output-prefix", str(out / "p")
        )
        left = sorted(os.listdir(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: --output-prefix {out / 'p'}: cannot write (No space left on device)")
    assert proc.stderr.count("\n") == 1 and left == []


@pytest.mark.slow
def test_huge_document_memory_is_bounded(tmp_path, spm_model, glm_tokenizer):
    """One 12 MB document: tokenized in pieces (same ids as whole), peak memory a few times the text, not ~15x."""
    words = np.random.default_rng(0).choice(
        ["alpha", "beta", "gamma", "delta", "list.", "tuple", "x = 1;"], size=1_750_000
    )
    text = " ".join(words.tolist())
    corpus = tmp_path / "huge.txt"
    corpus.write_text(text + "\n")
    script = (
        "import sys\n"
        "from megatron_glm.data.preprocess import PreprocessConfig, preprocess\n"
        "preprocess(PreprocessConfig(inputs=[sys.argv[1]], output_prefix=sys.argv[2], tokenizer_model=sys.argv[3]),"
        " log=lambda _l: None)\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(corpus), str(tmp_path / "h"), str(spm_model)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    peak_mb = int(proc.stdout.split()[-1]) / 1024
    size_mb = len(text) / 2**20
    ids = IndexedDataset(tmp_path / "h_text_document")[0]
    assert len(ids) > 1_500_000
    # The ids equal a whole-text encoding on a sample window cut at spaces (the piecewise cut is exact).
    head = text[: 1 << 21]
    head = head[: head.rfind(" ")]
    whole = glm_tokenizer._encode_plain(head)
    assert ids[: len(whole) - 1].tolist() == whole[:-1]
    # Without pieces the id list alone is ~36 bytes a token (> 55 MB here) on top of 3 copies of the text.
    assert peak_mb < 150 + 4 * size_mb, (peak_mb, size_mb)
