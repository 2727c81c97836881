"""Corpus preprocessing: JSONL/text -> tokens -> Megatron ``.bin/.idx`` datasets.

The input files are cut into chunks of about ``chunk_bytes`` at line boundaries. Each worker process
reads its chunks straight from the files, tokenizes them and writes one shard dataset per chunk and
key; the parent only merges finished shards, in input order, into the outputs (a file copy plus
index arithmetic). So no token passes through a pipe, the workers scale with cores, memory is
bounded by the chunk size whatever the input size, and the output bytes are the same for any number
of workers. Outputs get their final names only when everything succeeded.

Outputs: ``{output_prefix}_{key}_{sentence|document}.bin/.idx`` per JSON key (``text`` for plain
text input). With ``split_sentences`` each sentence is one sequence (see
:mod:`megatron_glm.data.sentence_split`), so the sentence objective samples real boundaries; the
pieces concatenate to the document, so decoding a document's sequences gives its text back.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain, pairwise

import numpy as np

from megatron_glm.data.corpus import INPUT_FORMATS, PROBLEM_KINDS, LineProblem, expand_inputs, parse_line
from megatron_glm.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron_glm.data.sentence_split import split_sentences
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.errors import DataError

__all__ = ["PreprocessConfig", "PreprocessSummary", "Problem", "output_prefix_for", "plan_chunks", "preprocess"]

#: Bad lines reported individually (by file and line number); the rest are only counted.
MAX_REPORTED = 10


@dataclass
class PreprocessConfig:
    """What to preprocess and how (the flags of ``tools/preprocess_data.py``)."""

    inputs: list[str]
    """Input files or glob patterns, processed in the order given (each glob sorted)."""
    output_prefix: str
    """Outputs are ``{output_prefix}_{key}_{sentence|document}.bin/.idx``."""
    tokenizer_model: str
    """Path of the sentencepiece model (:class:`GLMTokenizer`)."""
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    """JSONL keys to tokenize, each into its own dataset; a line missing one is skipped for all."""
    input_format: str = "jsonl"
    """``jsonl`` (one JSON object a line) or ``text`` (one document a line)."""
    workers: int = 1
    """Worker processes; 1 runs in this process."""
    split_sentences: bool = False
    """Store one sequence per sentence instead of one per document."""
    append_eod: bool = False
    """Append ``[eos]`` to the last sequence of every document."""
    strict: bool = False
    """Stop at the first bad line instead of skipping it."""
    log_interval: int = 10000
    """Print a progress line every this many documents (checked as chunks finish)."""
    chunk_bytes: int = 8 << 20
    """Input bytes per work unit (also what bounds each worker's memory)."""

    def validate(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise DataError(f"--input-format {self.input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
        if self.input_format == "text":
            self.json_keys = ["text"]
        if not self.json_keys or any(not key for key in self.json_keys):
            raise DataError(f"--json-keys {self.json_keys}: expected one or more non-empty keys")
        if len(set(self.json_keys)) != len(self.json_keys):
            raise DataError(f"--json-keys {self.json_keys}: keys repeat")
        if self.workers < 1:
            raise DataError(f"--workers {self.workers}: expected at least 1")
        if self.log_interval < 1:
            raise DataError(f"--log-interval {self.log_interval}: expected at least 1")
        if self.chunk_bytes < 1:
            raise DataError(f"chunk_bytes {self.chunk_bytes}: expected at least 1")
        directory = os.path.dirname(os.path.abspath(self.output_prefix))
        if not os.path.isdir(directory):
            raise DataError(f"--output-prefix {self.output_prefix}: directory {directory} does not exist")


@dataclass(frozen=True)
class Problem:
    """A skipped line."""

    path: str
    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class PreprocessSummary:
    """What a run read, wrote and skipped."""

    outputs: dict[str, str] = field(default_factory=dict)
    """Key -> output prefix."""
    files: int = 0
    documents: int = 0
    """Documents written (to every output)."""
    lines: int = 0
    blank_lines: int = 0
    bytes: int = 0
    """Input bytes read."""
    tokens: dict[str, int] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad lines by kind (see :data:`~megatron_glm.data.corpus.PROBLEM_KINDS`)."""
    problems: list[Problem] = field(default_factory=list)
    """The first :data:`MAX_REPORTED` bad lines."""
    seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def rate_line(self, seconds: float | None = None) -> str:
        elapsed = max(seconds if seconds is not None else self.seconds, 1e-9)
        return (
            f"{self.documents:,} documents ({self.documents / elapsed:,.0f} docs/s), "
            f"{self.bytes / 1e6:,.1f} MB ({self.bytes / 1e6 / elapsed:.2f} MB/s), "
            f"{self.total_tokens:,} tokens ({self.total_tokens / elapsed:,.0f} tokens/s)"
        )

    def report(self) -> list[str]:
        """The end-of-run summary, one line each."""
        lines = [f"done in {self.seconds:.1f}s: {self.rate_line()}"]
        for key, prefix in self.outputs.items():
            lines.append(f"  {prefix}.bin/.idx: {self.sequences[key]:,} sequences, {self.tokens[key]:,} tokens")
        skipped = sum(self.skipped.values())
        if skipped:
            kinds = ", ".join(f"{self.skipped[k]} {k}" for k in PROBLEM_KINDS if self.skipped.get(k))
            lines.append(f"skipped {skipped} bad line(s) of {self.lines:,}: {kinds}")
            lines.extend(f"  {problem}" for problem in self.problems)
            if skipped > len(self.problems):
                lines.append(f"  ... and {skipped - len(self.problems)} more")
        return lines


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool) -> str:
    """``{output_prefix}_{key}_{sentence|document}`` (Megatron's naming)."""
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


@dataclass(frozen=True)
class _Chunk:
    index: int
    file_index: int
    path: str
    start: int
    end: int


def plan_chunks(paths: Sequence[str], chunk_bytes: int) -> list[_Chunk]:
    """Cut every file into byte ranges of about ``chunk_bytes`` that start at line starts."""
    chunks: list[_Chunk] = []
    for file_index, path in enumerate(paths):
        size = os.path.getsize(path)
        bounds = [0]
        with open(path, "rb") as stream:
            target = chunk_bytes
            while target < size:
                stream.seek(target - 1)
                stream.readline()  # the boundary is just after the newline ending this line
                bound = stream.tell()
                if bound >= size:
                    break
                bounds.append(bound)
                target = bound + chunk_bytes
        bounds.append(size)
        for start, end in pairwise(bounds):
            if end > start or size == 0:
                chunks.append(_Chunk(len(chunks), file_index, path, start, end))
    return chunks


@dataclass
class _ChunkResult:
    index: int
    shard_prefixes: dict[str, str]
    lines: int = 0
    blank_lines: int = 0
    bytes: int = 0
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    problems: list[tuple[int, LineProblem]] = field(default_factory=list)
    """(line number within the chunk, problem) for the first few bad lines."""


@dataclass(frozen=True)
class _Job:
    tokenizer_model: str
    keys: tuple[str, ...]
    input_format: str
    split_sentences: bool
    append_eod: bool
    strict: bool
    shard_dir: str


_WORKER: dict[str, object] = {}


def _init_worker(job: _Job) -> None:
    tokenizer = GLMTokenizer(job.tokenizer_model)
    _WORKER.update(job=job, tokenizer=tokenizer, dtype=best_dtype(tokenizer.vocab_size))


def _process_chunk(chunk: _Chunk) -> _ChunkResult:
    job: _Job = _WORKER["job"]  # type: ignore[assignment]
    tokenizer: GLMTokenizer = _WORKER["tokenizer"]  # type: ignore[assignment]
    dtype: np.dtype = _WORKER["dtype"]  # type: ignore[assignment]
    encode = tokenizer._encode_plain  # corpus text: command tokens written in it stay text
    eod = tokenizer.eos_id
    keys, split, append_eod = job.keys, job.split_sentences, job.append_eod
    result = _ChunkResult(
        chunk.index, {key: os.path.join(job.shard_dir, f"{chunk.index:06d}_{k}") for k, key in enumerate(keys)}
    )
    builders = {key: IndexedDatasetBuilder(result.shard_prefixes[key], dtype) for key in keys}
    tokens = dict.fromkeys(keys, 0)
    sequences = dict.fromkeys(keys, 0)

    def problem(lineno: int, issue: LineProblem) -> bool:
        result.skipped[issue.kind] += 1
        if len(result.problems) < MAX_REPORTED:
            result.problems.append((lineno, issue))
        return job.strict

    try:
        with open(chunk.path, "rb") as stream:
            stream.seek(chunk.start)
            position, lineno = chunk.start, 0
            for raw in stream:
                if position >= chunk.end:
                    break
                position += len(raw)
                lineno += 1
                texts, issue = parse_line(raw, job.input_format, keys)
                if texts is None:
                    if issue is None:
                        result.blank_lines += 1
                    elif problem(lineno, issue):
                        break
                    continue
                if split:
                    encoded = [[ids for ids in map(encode, split_sentences(text)) if ids] for text in texts]
                else:
                    encoded = [encode(text) for text in texts]
                empty = next((key for key, ids in zip(keys, encoded) if not ids), None)
                if empty is not None:
                    if problem(lineno, LineProblem("empty_document", f"key {empty!r} has no tokens")):
                        break
                    continue
                for key, ids in zip(keys, encoded):
                    if split:
                        if append_eod:
                            ids[-1].append(eod)
                        lengths = [len(sentence) for sentence in ids]
                        flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=sum(lengths))
                        builders[key].add_document(flat, lengths)
                        tokens[key] += len(flat)
                        sequences[key] += len(ids)
                    else:
                        if append_eod:
                            ids.append(eod)
                        builders[key].add_document(np.array(ids, dtype=dtype), (len(ids),))
                        tokens[key] += len(ids)
                        sequences[key] += 1
                result.documents += 1
            result.lines = lineno
            result.bytes = position - chunk.start
        for builder in builders.values():
            builder.finalize()
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    result.tokens, result.sequences = tokens, sequences
    return result


def preprocess(config: PreprocessConfig, log: Callable[[str], None] = print) -> PreprocessSummary:
    """Tokenize ``config.inputs`` into indexed datasets; returns what was done (and logs progress)."""
    config.validate()
    start = time.perf_counter()
    paths = expand_inputs(config.inputs)
    tokenizer = GLMTokenizer(config.tokenizer_model)  # fail early on a bad model
    dtype = best_dtype(tokenizer.vocab_size)
    keys = tuple(config.json_keys)
    summary = PreprocessSummary(files=len(paths))
    summary.outputs = {key: output_prefix_for(config.output_prefix, key, config.split_sentences) for key in keys}
    summary.tokens = dict.fromkeys(keys, 0)
    summary.sequences = dict.fromkeys(keys, 0)
    chunks = plan_chunks(paths, config.chunk_bytes)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    log(
        f"preprocessing {len(paths)} file(s), {total_bytes / 1e6:,.1f} MB in {len(chunks)} chunk(s) with "
        f"{config.workers} worker(s); tokenizer vocab {tokenizer.vocab_size} -> {dtype} tokens"
    )
    shard_dir = tempfile.mkdtemp(
        prefix=os.path.basename(config.output_prefix) + ".shards-",
        dir=os.path.dirname(os.path.abspath(config.output_prefix)),
    )
    job = _Job(
        tokenizer_model=config.tokenizer_model,
        keys=keys,
        input_format=config.input_format,
        split_sentences=config.split_sentences,
        append_eod=config.append_eod,
        strict=config.strict,
        shard_dir=shard_dir,
    )
    outputs = {key: IndexedDatasetBuilder(prefix, dtype) for key, prefix in summary.outputs.items()}
    file_lines = [0] * len(paths)
    next_log = config.log_interval
    pool = None
    try:
        if config.workers == 1 or len(chunks) <= 1:
            _init_worker(job)
            results = map(_process_chunk, chunks)
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = context.Pool(min(config.workers, len(chunks)), initializer=_init_worker, initargs=(job,))
            results = pool.imap(_process_chunk, chunks, chunksize=1)
        for chunk, result in zip(chunks, results):
            for lineno, issue in result.problems:
                found = Problem(chunk.path, file_lines[chunk.file_index] + lineno, issue.kind, issue.message)
                if config.strict:
                    raise DataError(f"{found} (--strict)")
                if len(summary.problems) < MAX_REPORTED:
                    summary.problems.append(found)
            file_lines[chunk.file_index] += result.lines
            for key in keys:
                outputs[key].add_index(result.shard_prefixes[key])
                for suffix in (".bin", ".idx"):
                    os.remove(result.shard_prefixes[key] + suffix)
                summary.tokens[key] += result.tokens[key]
                summary.sequences[key] += result.sequences[key]
            summary.lines += result.lines
            summary.blank_lines += result.blank_lines
            summary.bytes += result.bytes
            summary.documents += result.documents
            for kind, count in result.skipped.items():
                summary.skipped[kind] = summary.skipped.get(kind, 0) + count
            if summary.documents >= next_log:
                next_log = (summary.documents // config.log_interval + 1) * config.log_interval
                log(f"{summary.rate_line(time.perf_counter() - start)} ({summary.bytes / max(total_bytes, 1):.0%})")
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for builder in outputs.values():
            builder.finalize()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for builder in outputs.values():
            builder.abort()
        _WORKER.clear()
        shutil.rmtree(shard_dir, ignore_errors=True)
    summary.seconds = time.perf_counter() - start
    if summary.documents == 0:
        log(f"warning: no document was written from {', '.join(paths)}")
    return summary
