"""Corpora as they are stored: gzip / zstandard JSONL, Parquet, plain text, and globs mixing them, give the same
bytes as plain JSONL; preprocessing killed with ``kill -9`` resumes and never exposes a partial output."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_glm.data.corpus import pydoc_documents
from megatron_glm.data.preprocess import PreprocessConfig, preprocess, shard_dir_for
from megatron_glm.data.sources import describe
from megatron_glm.errors import DataError
from tests.data.conftest import REPO_ROOT

pa = pytest.importorskip("pyarrow", reason="pyarrow is pinned in requirements-dev.txt")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard", reason="zstandard is pinned in requirements-dev.txt")


def _texts() -> list[str]:
    # pydoc topics flattened to one line each (plain text holds one document a line).
    return [" ".join(text.split()) for _, text in pydoc_documents()]


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)).encode()


def _write_all(directory: Path, texts: list[str]) -> dict[str, list[Path]]:
    """The same documents in every container; ``mixed`` holds them split over four formats."""
    directory.mkdir()
    data = _jsonl(texts)
    (directory / "c.jsonl").write_bytes(data)
    (directory / "c.jsonl.gz").write_bytes(gzip.compress(data))
    (directory / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"n": list(range(len(texts))), "text": texts}), directory / "c.parquet", row_group_size=20)
    (directory / "c.txt").write_text("".join(t + "\n" for t in texts))
    mixed = directory / "mixed"
    mixed.mkdir()
    q = len(texts) // 4
    parts = [texts[:q], texts[q : 2 * q], texts[2 * q : 3 * q], texts[3 * q :]]
    (mixed / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(parts[0])))
    pq.write_table(pa.table({"text": parts[1]}), mixed / "b.parquet", row_group_size=7)
    (mixed / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(t + "\n" for t in parts[2]).encode()))
    (mixed / "d").write_bytes(_jsonl(parts[3]))  # no extension: JSONL found from the content
    return {
        "plain": [directory / "c.jsonl"],
        "gzip": [directory / "c.jsonl.gz"],
        "zstd": [directory / "c.jsonl.zst"],
        "parquet": [directory / "c.parquet"],
        "text": [directory / "c.txt"],
        "mixed": [mixed / "*"],
    }


def _run(inputs: list[Path], prefix: Path, spm_model: Path, **kwargs) -> str:
    config = PreprocessConfig(
        inputs=[str(p) for p in inputs],
        output_prefix=str(prefix),
        tokenizer_model=str(spm_model),
        split_sentences=True,
        append_eod=True,
        **kwargs,
    )
    return preprocess(config, log=lambda _line: None).outputs["text"]


def _bytes(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def test_every_container_gives_the_bytes_of_plain_jsonl(tmp_path, spm_model):
    corpora = _write_all(tmp_path / "in", _texts())
    assert [describe(str(p)).container for p in sorted((tmp_path / "in" / "mixed").iterdir())] == [
        "gzip",
        "parquet",
        "zstd",
        "plain",
    ]
    assert describe(str(tmp_path / "in" / "mixed" / "c.txt.zst")).record_format == "text"
    reference = _bytes(_run(corpora["plain"], tmp_path / "plain", spm_model))
    for name, inputs in corpora.items():
        if name != "plain":
            for workers in (1, 2):
                out = _run(inputs, tmp_path / f"{name}{workers}", spm_model, workers=workers, chunk_bytes=20_000)
                assert _bytes(out) == reference, (name, workers)


def test_parquet_column_by_name_and_format_errors(tmp_path, spm_model):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["first text", None, "third"], "n": [1, 2, 3]}), path)
    config = PreprocessConfig(
        inputs=[str(path)], output_prefix=str(tmp_path / "o"), tokenizer_model=str(spm_model), json_keys=["body"]
    )
    summary = preprocess(config, log=lambda _l: None)
    assert summary.documents == 2 and summary.skipped == {"missing_key": 1}
    assert str(summary.problems[0]) == f"{path}:2: key 'body' is null"
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text' \(columns: body, n\); name the text column"):
        preprocess(
            PreprocessConfig(inputs=[str(path)], output_prefix=str(tmp_path / "p"), tokenizer_model=str(spm_model)),
            log=lambda _l: None,
        )
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet\n")
    with pytest.raises(DataError, match=r"fake\.parquet: the name says parquet but the content is plain text"):
        describe(str(fake))


@pytest.mark.slow
def test_peak_memory_is_flat_with_input_size_for_every_container(tmp_path, spm_model):
    """4x more compressed / Parquet input must not need more memory (streamed, never read whole)."""
    texts = _texts()
    script = (
        "import sys\n"
        "from megatron_glm.data.preprocess import PreprocessConfig, preprocess\n"
        "preprocess(PreprocessConfig(inputs=sys.argv[1:-2], output_prefix=sys.argv[-2], tokenizer_model=sys.argv[-1],"
        " chunk_bytes=1 << 20), log=lambda _l: None)\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    peaks: dict[str, list[int]] = {}
    for copies in (4, 12):
        many = texts * copies
        d = tmp_path / f"x{copies}"
        d.mkdir()
        (d / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl(many), compresslevel=1))
        (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=1).compress(_jsonl(many)))
        pq.write_table(pa.table({"text": many}), d / "c.parquet", row_group_size=64)
        for name in ("c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
            proc = subprocess.run(
                [sys.executable, "-c", script, str(d / name), str(d / f"o_{name}"), str(spm_model)],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
            peaks.setdefault(name, []).append(int(proc.stdout.split()[-1]))
    for name, (small, large) in peaks.items():
        # KiB. The large input decompresses to ~16 MB more: holding it, its lines or its tokens would show.
        assert large - small < 6144, (name, peaks)


_KILL_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from megatron_glm.data import preprocess as p, preprocess_worker as w
real = w.process_chunk
def slow(chunk):
    out = real(chunk)
    time.sleep(0.4)
    return out
w.process_chunk = slow
cfg = p.PreprocessConfig(inputs=[sys.argv[1]], output_prefix=sys.argv[2], tokenizer_model=sys.argv[3],
                         split_sentences=True, append_eod=True, workers=2, chunk_bytes=40_000)
p.preprocess(cfg, log=lambda line: print(line, flush=True))
"""


@pytest.mark.slow
def test_kill_9_during_preprocessing_resumes_and_never_exposes_output(tmp_path, pydoc_jsonl, spm_model):
    reference = _run([pydoc_jsonl], tmp_path / "ref", spm_model)
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD.format(root=str(REPO_ROOT)))
    out = tmp_path / "out" / "p"
    out.parent.mkdir()
    shards = Path(shard_dir_for(str(out)))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(pydoc_jsonl), str(out), str(spm_model)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while len(list(shards.glob("*.done.json"))) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must die with it
    proc.wait()
    time.sleep(0.5)
    finished = len(list(shards.glob("*.done.json")))
    assert not [n for n in os.listdir(out.parent) if n.endswith((".bin", ".idx"))]  # nothing under a final name
    logs: list[str] = []
    config = PreprocessConfig(
        inputs=[str(pydoc_jsonl)],
        output_prefix=str(out),
        tokenizer_model=str(spm_model),
        split_sentences=True,
        append_eod=True,
        workers=2,
        chunk_bytes=40_000,
    )
    summary = preprocess(config, log=logs.append)
    assert any(f"resuming an interrupted run: {finished} of " in line for line in logs), logs
    assert summary.resumed_units == finished >= 3
    assert _bytes(summary.outputs["text"]) == _bytes(reference)
    assert sorted(os.listdir(out.parent)) == ["p_text_sentence.bin", "p_text_sentence.idx", "p_text_sentence.meta.json"]


def test_interrupted_run_with_other_options_restarts_cleanly(tmp_path, pydoc_jsonl, spm_model, monkeypatch):
    from megatron_glm.data import preprocess_worker

    real = preprocess_worker.process_chunk

    def interrupt(chunk):
        if chunk.index == 2:
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(preprocess_worker, "process_chunk", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run([pydoc_jsonl], tmp_path / "p", spm_model, chunk_bytes=50_000)
    assert sorted(os.listdir(tmp_path)) == ["p.shards"]
    monkeypatch.setattr(preprocess_worker, "process_chunk", real)
    logs: list[str] = []
    config = PreprocessConfig(
        inputs=[str(pydoc_jsonl)],
        output_prefix=str(tmp_path / "p"),
        tokenizer_model=str(spm_model),
        split_sentences=False,
        chunk_bytes=50_000,
    )
    summary = preprocess(config, log=logs.append)
    assert summary.resumed_units == 0
    assert any("restarting: the inputs or options changed" in line for line in logs), logs
    fresh = preprocess(
        PreprocessConfig(inputs=[str(pydoc_jsonl)], output_prefix=str(tmp_path / "f"), tokenizer_model=str(spm_model)),
        log=lambda _l: None,
    )
    assert _bytes(summary.outputs["text"]) == _bytes(fresh.outputs["text"])
    assert not Path(shard_dir_for(str(tmp_path / "p"))).exists()
