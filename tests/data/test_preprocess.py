"""Preprocessing: round trips, worker-count invariance, bad input, atomic outputs, sentence splitting."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_glm.data import preprocess_worker
from megatron_glm.data.corpus import pydoc_documents
from megatron_glm.data.indexed_dataset import IndexedDataset
from megatron_glm.data.preprocess import PreprocessConfig, plan_chunks, preprocess
from megatron_glm.data.sentence_split import split_sentences
from megatron_glm.errors import DataError

from .conftest import REPO_ROOT


def quiet(_line: str) -> None:
    pass


def run(tmp_path, inputs, spm_model, name="out", **kwargs):
    config = PreprocessConfig(
        inputs=[str(p) for p in inputs], output_prefix=str(tmp_path / name), tokenizer_model=str(spm_model), **kwargs
    )
    return preprocess(config, log=quiet)


def read_bytes(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


def decoded_documents(tokenizer, prefix: str, eod: bool) -> list[str]:
    ds = IndexedDataset(prefix)
    texts = []
    for d in range(ds.num_documents):
        ids = np.concatenate(ds.document(d)).tolist()
        if eod:
            assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts


# -- sentence splitting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Hello world. This is Mr. Smith of the U.S. Army. Bye!",
            ["Hello world.", " This is Mr. Smith of the U.S. Army.", " Bye!"],
        ),
        (
            'He said "stop!" Then e.g. this. Pi is 3.14 today.',
            ['He said "stop!"', " Then e.g. this.", " Pi is 3.14 today."],
        ),
        ("第一句话。第二句！“第三句？”最后……结束", ["第一句话。", "第二句！", "“第三句？”", "最后……", "结束"]),
        ("你好!世界. Next one.", ["你好!", "世界.", " Next one."]),
        ("Title\n\n  Paragraph one\ncontinues.\n\n", ["Title", "\n\n  Paragraph one\ncontinues.\n\n"]),
        ("no terminator", ["no terminator"]),
        ("", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_split_sentences_is_lossless_on_pydoc():
    for _, text in pydoc_documents():
        pieces = split_sentences(text)
        assert "".join(pieces) == text
        assert all(piece.strip() for piece in pieces)
        assert len(pieces) > 1 or len(text) < 200


# -- chunking ----------------------------------------------------------------------------------------


def test_plan_chunks_align_to_lines(tmp_path):
    path = tmp_path / "lines.txt"
    lines = [b"x" * n + b"\n" for n in (0, 5, 17, 1, 40, 3, 0, 9)]
    path.write_bytes(b"".join(lines) + b"tail without newline")
    starts = {0}
    offset = 0
    for line in lines:
        offset += len(line)
        starts.add(offset)
    for chunk_bytes in (1, 7, 16, 1000):
        chunks = plan_chunks([str(path)], chunk_bytes)
        assert chunks[0].start == 0 and chunks[-1].end == path.stat().st_size
        assert all(a.end == b.start for a, b in itertools.pairwise(chunks))
        assert all(c.start in starts and c.end > c.start for c in chunks)


# -- round trips and determinism --------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["document", "sentence"])
def test_round_trip_and_worker_invariance(tmp_path, pydoc_jsonl, spm_model, glm_tokenizer, split):
    """decode(read(preprocess(corpus))) == corpus, and the bytes do not depend on workers or chunks."""
    texts = [text for _, text in pydoc_documents()]
    one = run(tmp_path, [pydoc_jsonl], spm_model, "w1", split_sentences=split, append_eod=True, workers=1)
    two = run(
        tmp_path,
        [pydoc_jsonl],
        spm_model,
        "w2",
        split_sentences=split,
        append_eod=True,
        workers=2,
        chunk_bytes=50_000,
    )
    prefix1, prefix2 = one.outputs["text"], two.outputs["text"]
    assert prefix1.endswith("w1_text_" + ("sentence" if split else "document"))
    assert read_bytes(prefix1) == read_bytes(prefix2)
    assert decoded_documents(glm_tokenizer, prefix1, eod=True) == texts
    assert one.documents == two.documents == len(texts) and one.tokens == two.tokens
    ds = IndexedDataset(prefix1)
    assert ds.dtype == np.uint16 and ds.num_tokens == one.tokens["text"]
    if split:
        # One sequence per sentence, each decoding to exactly the splitter's piece.
        first = [glm_tokenizer.decode(seq) for seq in ds.document(0)]
        expected = split_sentences(texts[0])
        assert first[:-1] == expected[:-1] and first[-1] == expected[-1] + "[eos]"
        assert len(ds) == one.sequences["text"] > 10 * len(texts)
    else:
        assert len(ds) == len(texts)


def test_pydoc_dataset_fixture(pydoc_dataset, glm_tokenizer):
    sentences, documents = IndexedDataset(pydoc_dataset["sentence"]), IndexedDataset(pydoc_dataset["document"])
    assert sentences.num_documents == documents.num_documents == len(pydoc_documents())
    assert len(documents) == documents.num_documents < len(sentences)
    assert documents[0][-1] == glm_tokenizer.eos_id


def test_multiple_keys_and_text_format(tmp_path, spm_model, glm_tokenizer):
    corpus = tmp_path / "c.jsonl"
    records = [{"title": f"Title {i}", "text": f"Body number {i}. Second sentence {i}!"} for i in range(5)]
    records[2] = {"text": "no title here"}  # skipped for both keys so the outputs stay aligned
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = run(tmp_path, [corpus], spm_model, json_keys=["title", "text"], split_sentences=True)
    assert summary.skipped == {"missing_key": 1} and summary.documents == 4
    titles = decoded_documents(glm_tokenizer, summary.outputs["title"], eod=False)
    bodies = decoded_documents(glm_tokenizer, summary.outputs["text"], eod=False)
    assert titles == [r["title"] for r in records if "title" in r]
    assert bodies == [r["text"] for r in records if "title" in r]
    assert summary.sequences == {"title": 4, "text": 8}

    text = tmp_path / "plain.txt"
    text.write_bytes(b"first document\r\nsecond one\n\n  third [MASK] stays text  \n")
    summary = run(tmp_path, [text], spm_model, "plain", input_format="text", json_keys=["ignored"])
    assert summary.outputs == {"text": str(tmp_path / "plain_text_document")}
    assert summary.blank_lines == 1
    decoded = decoded_documents(glm_tokenizer, summary.outputs["text"], eod=False)
    assert decoded == ["first document", "second one", "  third [MASK] stays text  "]
    assert glm_tokenizer.mask_id not in IndexedDataset(summary.outputs["text"])[2].tolist()


# -- bad input ---------------------------------------------------------------------------------------

BAD_LINES = [
    (b'{"text": "good one"}\n', None),
    (b'{"text": "unterminated\n', "invalid_json"),
    (b'{"other": "x"}\n', "missing_key"),
    (b'{"text": 42}\n', "not_a_string"),
    (b'{"text": "bad \xff\xfe bytes"}\n', "invalid_utf8"),
    (b'{"text": ""}\n', "empty_document"),
    (b"\n", None),
    (b"[1, 2]\n", "invalid_json"),
    (b'{"text": null}\n', "not_a_string"),
    (b'{"text": "good two"}\n', None),
]


def write_bad_corpus(tmp_path, copies: int = 3):
    paths = []
    for f in range(2):
        path = tmp_path / f"bad{f}.jsonl"
        path.write_bytes(b"".join(line for _ in range(copies) for line, _ in BAD_LINES))
        paths.append(path)
    return paths


def test_bad_lines_are_counted_and_located(tmp_path, spm_model, glm_tokenizer):
    paths = write_bad_corpus(tmp_path)
    for workers, chunk_bytes in ((1, 1 << 20), (2, 40)):
        summary = run(
            tmp_path, paths, spm_model, f"bad{workers}", workers=workers, chunk_bytes=chunk_bytes, max_bad_fraction=0.9
        )
        assert summary.documents == 2 * 3 * 2
        assert summary.skipped == {
            "invalid_json": 12,
            "missing_key": 6,
            "not_a_string": 12,
            "invalid_utf8": 6,
            "empty_document": 6,
        }
        assert summary.blank_lines == 6 and summary.lines == 60
        located = [(os.path.basename(p.path), p.line, p.kind) for p in summary.problems]
        assert located == [
            ("bad0.jsonl", 2, "invalid_json"),
            ("bad0.jsonl", 3, "missing_key"),
            ("bad0.jsonl", 4, "not_a_string"),
            ("bad0.jsonl", 5, "invalid_utf8"),
            ("bad0.jsonl", 6, "empty_document"),
            ("bad0.jsonl", 8, "invalid_json"),
            ("bad0.jsonl", 9, "not_a_string"),
            ("bad0.jsonl", 12, "invalid_json"),
            ("bad0.jsonl", 13, "missing_key"),
            ("bad0.jsonl", 14, "not_a_string"),
        ]
        report = "\n".join(summary.report())
        assert "skipped 42 bad line(s) of 60" in report and "... and 32 more" in report
        assert decoded_documents(glm_tokenizer, summary.outputs["text"], eod=False) == ["good one", "good two"] * 6


def test_strict_stops_at_first_bad_line_and_writes_nothing(tmp_path, spm_model):
    paths = write_bad_corpus(tmp_path)
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"bad0\.jsonl:2: invalid JSON .*\(--strict\)"):
            run(tmp_path, paths, spm_model, "strict", workers=workers, chunk_bytes=40, strict=True)
    assert sorted(os.listdir(tmp_path)) == ["bad0.jsonl", "bad1.jsonl"]


def test_interrupted_run_leaves_no_output(tmp_path, pydoc_jsonl, spm_model, monkeypatch):
    real = preprocess_worker.process_chunk

    def flaky(chunk):
        if chunk.index == 3:
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(preprocess_worker, "process_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, [pydoc_jsonl], spm_model, chunk_bytes=50_000)
    assert os.listdir(tmp_path) == ["out.shards"]  # no output; the finished units stay for a rerun to resume


def test_config_errors(tmp_path, pydoc_jsonl, spm_model):
    with pytest.raises(DataError, match=r"--input .*missing\.jsonl: file not found"):
        run(tmp_path, [tmp_path / "missing.jsonl"], spm_model)
    with pytest.raises(DataError, match=r"nope\.model: tokenizer model not found"):
        run(tmp_path, [pydoc_jsonl], tmp_path / "nope.model")
    with pytest.raises(DataError, match="--workers 0: expected at least 1"):
        run(tmp_path, [pydoc_jsonl], spm_model, workers=0)
    with pytest.raises(DataError, match=r"--output-prefix .*: directory .* does not exist"):
        run(tmp_path / "no" / "dir", [pydoc_jsonl], spm_model)


# -- the command-line tool ---------------------------------------------------------------------------


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/preprocess_data.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_tool(tmp_path, pydoc_jsonl, spm_model):
    result = run_tool(
        "--input",
        str(pydoc_jsonl),
        "--tokenizer-model",
        str(spm_model),
        "--output-prefix",
        str(tmp_path / "p"),
        "--split-sentences",
        "--append-eod",
        "--workers",
        "2",
        "--log-interval",
        "10",
        "--chunk-mb",
        "0.05",
    )
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stdout.splitlines() if "docs/s" in line]
    assert progress and all("MB/s" in line and "tokens/s" in line for line in progress)
    assert result.stdout.splitlines()[-2].startswith("done in ")
    assert IndexedDataset(tmp_path / "p_text_sentence").num_documents == len(pydoc_documents())

    bad = write_bad_corpus(tmp_path, copies=1)[0]
    result = run_tool(
        "--input", str(bad), "--tokenizer-model", str(spm_model), "--output-prefix", str(tmp_path / "s"), "--strict"
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {bad}:2: invalid JSON (Invalid control character at column 23) (--strict)\n"


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_input(tmp_path, pydoc_jsonl, spm_model):
    """Preprocessing 4x more input must not need more memory (streaming, chunked, spilled index)."""
    line = pydoc_jsonl.read_bytes()
    script = (
        "import resource, sys\n"
        "from megatron_glm.data.preprocess import PreprocessConfig, preprocess\n"
        "preprocess(PreprocessConfig(inputs=[sys.argv[1]], output_prefix=sys.argv[2], tokenizer_model=sys.argv[3],"
        " split_sentences=True, workers=2, chunk_bytes=1 << 20), log=lambda _l: None)\n"
        # VmHWM, not RUSAGE_SELF: ru_maxrss survives exec, so it would include the pytest process.
        "own = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(own, kids)\n"
    )
    peaks = []
    for copies in (4, 16):
        corpus = tmp_path / f"corpus{copies}.jsonl"
        with open(corpus, "wb") as out:
            for _ in range(copies):
                out.write(line)
        result = subprocess.run(
            [sys.executable, "-c", script, str(corpus), str(tmp_path / f"o{copies}"), str(spm_model)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        peaks.append([int(x) for x in result.stdout.split()])
    (small_parent, small_worker), (large_parent, large_worker) = peaks
    # KiB. The large corpus is 6 MB bigger: holding it (or its lines, tokens or index) in memory would show.
    assert large_parent - small_parent < 4096, peaks
    assert large_worker - small_worker < 4096, peaks


def test_megatron_core_reads_preprocessed_output(pydoc_dataset):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    for prefix in pydoc_dataset.values():
        ours, theirs = IndexedDataset(prefix), MegatronIndexedDataset(prefix)
        assert np.array_equal(ours.document_indices, theirs.document_indices)
        assert np.array_equal(ours.sequence_lengths, theirs.sequence_lengths)
        assert all(np.array_equal(ours[i], theirs[i]) for i in range(len(ours)))
