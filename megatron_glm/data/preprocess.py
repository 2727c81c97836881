"""Corpus preprocessing: JSONL/text (plain, gzip, zstandard) or Parquet -> tokens -> Megatron ``.bin/.idx``.

The inputs are cut into work units (:mod:`megatron_glm.data.sources`: byte ranges of about ``chunk_bytes``
at line boundaries for plain files, a whole compressed file, a Parquet row group). Each worker process
reads its units straight from the files, tokenizes them and writes one shard dataset per unit and key;
the parent only merges finished shards, in input order, into the outputs (a file copy plus index
arithmetic). So no token passes through a pipe, the workers scale with cores, memory is bounded by the
unit size whatever the input size (a huge document is tokenized in pieces), and the output bytes are the
same for any number of workers and whatever the container.

Surviving a kill: shards live in ``{output_prefix}.shards/`` next to a ``plan.json`` describing the inputs
and options; a finished unit gets a ``NNNNNN.done.json``. Rerunning the same command after a crash or
``kill -9`` reuses the finished units and does the rest; a changed input or option restarts cleanly.
Outputs get their final names only when everything succeeded, then the shard folder is removed.
Input that is mostly bad (above ``max_bad_fraction``) or gives no document at all is an error, and
nothing is written.

Outputs: ``{output_prefix}_{key}_{sentence|document}.bin/.idx`` per JSON key (``text`` for plain
text input). With ``split_sentences`` each sentence is one sequence (see
:mod:`megatron_glm.data.sentence_split`), so the sentence objective samples real boundaries; the
pieces concatenate to the document, so decoding a document's sequences gives its text back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from megatron_glm.config.sections import opt
from megatron_glm.data.corpus import INPUT_FORMATS, PROBLEM_KINDS, LineProblem, expand_inputs
from megatron_glm.data.dataset_meta import meta_path, write_dataset_meta
from megatron_glm.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, bin_path, idx_path
from megatron_glm.data.preprocess_encode import WorkerEncoder, encoded_records
from megatron_glm.data.sources import SourceFile, WorkUnit, describe, iter_records, plan_units
from megatron_glm.data.tokenizer import open_tokenizer, tokenizer_fingerprint
from megatron_glm.errors import DataError
from megatron_glm.locking import LockBusy, acquire_lock, pid_alive

__all__ = [
    "PreprocessConfig",
    "PreprocessSummary",
    "Problem",
    "output_prefix_for",
    "plan_chunks",
    "preprocess",
    "shard_dir_for",
]

#: Bad lines reported individually (by file and line number); the rest are only counted.
MAX_REPORTED = 10


@dataclass(kw_only=True)
class PreprocessConfig:
    """What to preprocess and how (``tools/preprocess_data.py``'s options; ``--help`` shows this help)."""

    inputs: list[str] = opt(
        [],
        "Input files or glob patterns: JSONL / text (plain, .gz, .zst) or Parquet, mixed freely; processed in "
        "the order given (each glob sorted).",
        required=True,
    )
    output_prefix: str = opt("", "Outputs are {output_prefix}_{key}_{sentence|document}.bin/.idx.", required=True)
    tokenizer_model: str = opt(
        "",
        "The tokenizer: a sentencepiece model, a tokenizer.json (or a folder holding one) or a tiktoken BPE file.",
        required=True,
    )
    json_keys: list[str] = opt(
        ["text"],
        "JSONL keys (Parquet columns) to tokenize, each into its own dataset; a line missing one is skipped for all.",
    )
    input_format: str = opt(
        "auto",
        "auto (per file, by extension, else by the first line), jsonl (one JSON object a line) or text (one "
        "document a line); Parquet files are always read by column (the JSON keys name the columns).",
        choices=INPUT_FORMATS,
    )
    workers: int = opt(1, "Worker processes; 1 runs in this process.")
    split_sentences: bool = opt(False, "Store one sequence per sentence instead of one per document.")
    append_eod: bool = opt(False, "Append [eos] to the last sequence of every document.")
    strict: bool = opt(False, "Stop at the first bad line instead of skipping it.")
    log_interval: int = opt(10000, "Print a progress line every this many documents (checked as chunks finish).")
    chunk_bytes: int = opt(
        8 << 20,
        "Input bytes per work unit of a plain file (also what bounds each worker's memory); the tool's "
        "--chunk-mb gives it in MB.",
    )
    max_bad_fraction: float = opt(
        0.5, "Fail (writing nothing) when more than this fraction of the non-blank records is bad."
    )

    def validate(self) -> None:
        for flag, value in (
            ("--input", self.inputs),
            ("--output-prefix", self.output_prefix),
            ("--tokenizer-model", self.tokenizer_model),
        ):
            if not value:
                raise DataError(f"{flag} is required")
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
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise DataError(f"--max-bad-fraction {self.max_bad_fraction}: expected a fraction in [0, 1]")
        directory = os.path.dirname(os.path.abspath(self.output_prefix))
        if not os.path.isdir(directory):
            raise DataError(f"--output-prefix {self.output_prefix}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            raise DataError(f"--output-prefix {self.output_prefix}: directory {directory} is not writable")


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
    resumed_units: int = 0
    """Work units reused from an interrupted run."""
    max_token_id: dict[str, int] = field(default_factory=dict)

    @property
    def bad_fraction(self) -> float:
        """Bad records over non-blank records."""
        return sum(self.skipped.values()) / max(1, self.lines - self.blank_lines)

    def kinds(self) -> str:
        return ", ".join(f"{self.skipped[k]} {k}" for k in PROBLEM_KINDS if self.skipped.get(k))

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
            lines.append(
                f"skipped {skipped} bad line(s) of {self.lines:,} ({self.bad_fraction:.1%} of the non-blank "
                f"ones): {self.kinds()}"
            )
            lines.extend(f"  {problem}" for problem in self.problems)
            if skipped > len(self.problems):
                lines.append(f"  ... and {skipped - len(self.problems)} more")
        return lines


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool) -> str:
    """``{output_prefix}_{key}_{sentence|document}`` (Megatron's naming)."""
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def plan_chunks(paths: Sequence[str | SourceFile], chunk_bytes: int) -> list[WorkUnit]:
    """The work units of ``paths`` (see :func:`megatron_glm.data.sources.plan_units`)."""
    return plan_units(paths, chunk_bytes)


def shard_dir_for(output_prefix: str) -> str:
    """Where the shards of an unfinished run live (kept after a kill so that a rerun resumes)."""
    return os.path.abspath(output_prefix) + ".shards"


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
    max_token_id: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    """(line number within the unit, kind, message) for the first few bad lines."""


@dataclass(frozen=True)
class _Job:
    tokenizer_model: str
    keys: tuple[str, ...]
    split_sentences: bool
    append_eod: bool
    strict: bool
    shard_dir: str


#: The encoder of this worker process (set by ``_init_worker``; one per process, never shared).
_WORKER: dict[str, object] = {}


def _die_with_parent() -> None:
    """Linux: a worker is killed when the parent dies (``kill -9`` leaves no orphan tokenizing on)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _init_worker(job: _Job, in_pool: bool = False) -> None:
    if in_pool:
        _die_with_parent()
    _WORKER.update(job=job, encoder=WorkerEncoder.open(job.tokenizer_model, single_thread=in_pool))


def _process_chunk(chunk: WorkUnit) -> _ChunkResult:
    job: _Job = _WORKER["job"]  # type: ignore[assignment]
    encoder: WorkerEncoder = _WORKER["encoder"]  # type: ignore[assignment]
    dtype = encoder.dtype
    eod = np.array([encoder.tokenizer.eos_id], dtype=dtype)
    keys, split, append_eod = job.keys, job.split_sentences, job.append_eod
    result = _ChunkResult(
        chunk.index, {key: os.path.join(job.shard_dir, f"{chunk.index:06d}_{k}") for k, key in enumerate(keys)}
    )
    builders = {key: IndexedDatasetBuilder(result.shard_prefixes[key], dtype) for key in keys}
    tokens = dict.fromkeys(keys, 0)
    sequences = dict.fromkeys(keys, 0)
    top = dict.fromkeys(keys, -1)
    skipped: Counter = Counter()

    def problem(lineno: int, issue: LineProblem) -> bool:
        skipped[issue.kind] += 1
        if len(result.problems) < MAX_REPORTED:
            result.problems.append((lineno, issue.kind, issue.message))
        return job.strict

    lineno = 0
    try:
        for encoded, issue in encoded_records(iter_records(chunk, keys), encoder, split):
            lineno += 1
            if encoded is None:
                if issue is None:
                    result.blank_lines += 1
                elif problem(lineno, issue):
                    break
                continue
            empty = next((key for key, ids in zip(keys, encoded) if not len(ids)), None)
            if empty is not None:
                if problem(lineno, LineProblem("empty_document", f"key {empty!r} has no tokens")):
                    break
                continue
            for key, ids in zip(keys, encoded):
                pieces = ids if split else [ids]
                if append_eod:
                    pieces[-1] = np.concatenate([pieces[-1], eod])
                lengths = [len(piece) for piece in pieces]
                flat = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                builders[key].add_document(flat, lengths)
                tokens[key] += len(flat)
                sequences[key] += len(pieces)
                top[key] = max(top[key], int(flat.max()))
            result.documents += 1
        result.lines = lineno
        result.bytes = chunk.input_bytes
        for builder in builders.values():
            builder.finalize()
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    result.tokens, result.sequences, result.max_token_id = tokens, sequences, top
    result.skipped = dict(skipped)
    _write_json(os.path.join(job.shard_dir, f"{chunk.index:06d}.done.json"), asdict(result))
    return result


def _write_json(path: str, record: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(record, out)
    os.replace(tmp, path)


def _read_done(path: str) -> _ChunkResult | None:
    try:
        with open(path, encoding="utf-8") as stream:
            record = json.load(stream)
        result = _ChunkResult(**record)
    except (OSError, ValueError, TypeError):
        return None
    if not all(os.path.isfile(bin_path(p)) and os.path.isfile(idx_path(p)) for p in result.shard_prefixes.values()):
        return None
    result.problems = [tuple(p) for p in result.problems]  # type: ignore[misc]
    return result


def _plan_record(config: PreprocessConfig, sources: Sequence[SourceFile], keys: Sequence[str]) -> dict[str, Any]:
    """What the shards depend on: an interrupted run's shards are reused only when this is unchanged."""
    inputs = []
    for source in sources:
        stat = os.stat(source.path)
        inputs.append(
            [os.path.abspath(source.path), stat.st_size, stat.st_mtime_ns, source.container, source.record_format]
        )
    return {
        "version": 2,
        "inputs": inputs,
        "tokenizer_sha256": tokenizer_fingerprint(config.tokenizer_model),
        "keys": list(keys),
        "split_sentences": config.split_sentences,
        "append_eod": config.append_eod,
        "strict": config.strict,
        "chunk_bytes": config.chunk_bytes,
    }


def _remove_stale_temporaries(final_prefixes: Sequence[str]) -> None:
    """Remove ``{final}.bin.tmpPID*`` / ``.idx.tmpPID`` files of writers that are no longer running."""
    for prefix in final_prefixes:
        for path in glob.glob(glob.escape(prefix) + ".bin.tmp*") + glob.glob(glob.escape(prefix) + ".idx.tmp*"):
            digits = path.rsplit(".tmp", 1)[1].split(".")[0]
            if digits.isdigit() and not pid_alive(int(digits)):
                with contextlib.suppress(OSError):
                    os.remove(path)


def _open_shard_dir(config: PreprocessConfig, plan: dict[str, Any], log: Callable[[str], None]) -> tuple[str, Any]:
    """The shard folder, locked for this run, emptied unless it holds an interrupted run of the same plan."""
    shard_dir = shard_dir_for(config.output_prefix)
    try:
        os.makedirs(shard_dir, exist_ok=True)
        lock = acquire_lock(os.path.join(shard_dir, "lock"), log)
    except LockBusy as exc:
        raise DataError(
            f"--output-prefix {config.output_prefix}: another preprocessing run is writing it ({exc})"
        ) from None
    except OSError as exc:
        raise DataError(
            f"--output-prefix {config.output_prefix}: cannot create {shard_dir} ({exc.strerror or exc})"
        ) from None
    plan_file = os.path.join(shard_dir, "plan.json")
    previous = None
    with contextlib.suppress(OSError, ValueError), open(plan_file, encoding="utf-8") as stream:
        previous = json.load(stream)
    if previous != plan:
        stale = [n for n in os.listdir(shard_dir) if n != "lock"]
        if stale and previous is not None:
            log(f"restarting: the inputs or options changed since the interrupted run in {shard_dir}")
        for name in stale:
            path = os.path.join(shard_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        _write_json(plan_file, plan)
    else:  # same plan: drop what an interrupted writer left half-done
        for name in os.listdir(shard_dir):
            if ".tmp" in name:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(shard_dir, name))
    return shard_dir, lock


def preprocess(config: PreprocessConfig, log: Callable[[str], None] = print) -> PreprocessSummary:
    """Tokenize ``config.inputs`` into indexed datasets; returns what was done (and logs progress)."""
    config.validate()
    start = time.perf_counter()
    paths = expand_inputs(config.inputs)
    sources = [describe(path, config.input_format) for path in paths]
    keys = tuple(config.json_keys)
    texts_files = [s.path for s in sources if s.record_format == "text"]
    if texts_files and keys != ("text",):
        raise DataError(
            f"{texts_files[0]}: plain text holds one document a line (key 'text'); --json-keys "
            f"{' '.join(keys)} does not apply to it"
        )
    tokenizer = open_tokenizer(config.tokenizer_model)  # fail early on a bad model
    dtype = best_dtype(tokenizer.vocab_size)
    summary = PreprocessSummary(files=len(paths))
    summary.outputs = {key: output_prefix_for(config.output_prefix, key, config.split_sentences) for key in keys}
    summary.tokens = dict.fromkeys(keys, 0)
    summary.sequences = dict.fromkeys(keys, 0)
    summary.max_token_id = dict.fromkeys(keys, -1)
    chunks = plan_chunks(sources, config.chunk_bytes)
    total_bytes = sum(s.size for s in sources)
    _remove_stale_temporaries(list(summary.outputs.values()))
    shard_dir, lock = _open_shard_dir(config, _plan_record(config, sources, keys), log)
    done = {c.index: r for c in chunks if (r := _read_done(os.path.join(shard_dir, f"{c.index:06d}.done.json")))}
    summary.resumed_units = len(done)
    log(
        f"preprocessing {len(paths)} file(s), {total_bytes / 1e6:,.1f} MB in {len(chunks)} unit(s) with "
        f"{config.workers} worker(s); tokenizer vocab {tokenizer.vocab_size} -> {dtype} tokens"
    )
    if done:
        log(f"resuming an interrupted run: {len(done)} of {len(chunks)} unit(s) already done in {shard_dir}")
    job = _Job(
        tokenizer_model=config.tokenizer_model,
        keys=keys,
        split_sentences=config.split_sentences,
        append_eod=config.append_eod,
        strict=config.strict,
        shard_dir=shard_dir,
    )
    todo = [c for c in chunks if c.index not in done]
    outputs = {key: IndexedDatasetBuilder(prefix, dtype) for key, prefix in summary.outputs.items()}
    file_lines = [0] * len(paths)
    next_log = config.log_interval
    pool = None
    try:
        if config.workers == 1 or len(todo) <= 1:
            _init_worker(job)
            fresh = map(_process_chunk, todo)
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = context.Pool(min(config.workers, len(todo)), initializer=_init_worker, initargs=(job, True))
            fresh = pool.imap(_process_chunk, todo, chunksize=1)
        results = (done[c.index] if c.index in done else next(fresh) for c in chunks)
        for chunk, result in zip(chunks, results):
            for lineno, kind, message in result.problems:
                found = Problem(chunk.path, file_lines[chunk.file_index] + lineno, kind, message)
                if config.strict:
                    raise DataError(f"{found} (--strict)")
                if len(summary.problems) < MAX_REPORTED:
                    summary.problems.append(found)
            file_lines[chunk.file_index] += result.lines
            for key in keys:
                outputs[key].add_index(result.shard_prefixes[key])
                summary.tokens[key] += result.tokens[key]
                summary.sequences[key] += result.sequences[key]
                summary.max_token_id[key] = max(summary.max_token_id[key], result.max_token_id[key])
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
        _check_usable(summary, paths, config.max_bad_fraction)
        fingerprint = tokenizer_fingerprint(config.tokenizer_model)
        for key, builder in outputs.items():
            with contextlib.suppress(FileNotFoundError):
                os.remove(meta_path(summary.outputs[key]))  # a sidecar of earlier outputs must not outlive them
            builder.finalize()
            write_dataset_meta(
                summary.outputs[key],
                vocab_size=tokenizer.vocab_size,
                max_token_id=summary.max_token_id[key],
                tokenizer_fingerprint=fingerprint,
            )
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise DataError(
                f"--output-prefix {config.output_prefix}: cannot write ({exc.strerror}); nothing was "
                f"written under the final names"
            ) from None
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for builder in outputs.values():
            builder.abort()
        _WORKER.clear()
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        if not interrupted:  # kept only when interrupted (Ctrl-C, or kill -9 never gets here): a rerun resumes
            shutil.rmtree(shard_dir, ignore_errors=True)
        lock.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _check_usable(summary: PreprocessSummary, paths: Sequence[str], max_bad_fraction: float) -> None:
    """No document at all, or more bad records than ``max_bad_fraction``: an error, and nothing is written."""
    first = f"; first: {summary.problems[0]}" if summary.problems else ""
    bad = sum(summary.skipped.values())
    if summary.documents == 0:
        what = f"{bad} bad record(s) ({summary.kinds()})" if bad else "no records"
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise DataError(f"no usable document in {shown}: {summary.lines:,} line(s), {what}{first}; nothing was written")
    if summary.bad_fraction > max_bad_fraction:
        raise DataError(
            f"{bad:,} of {summary.lines - summary.blank_lines:,} non-blank records are bad "
            f"({summary.bad_fraction:.1%}: {summary.kinds()}), above --max-bad-fraction "
            f"{max_bad_fraction:g}{first}; nothing was written (wrong --input-format or --json-keys?)"
        )
