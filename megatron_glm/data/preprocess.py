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
import errno
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from megatron_glm.data import preprocess_worker
from megatron_glm.data.corpus import expand_inputs
from megatron_glm.data.dataset_meta import meta_path, write_dataset_meta
from megatron_glm.data.indexed_builder import IndexedDatasetBuilder
from megatron_glm.data.indexed_dataset import best_dtype
from megatron_glm.data.preprocess_config import PreprocessConfig, output_prefix_for
from megatron_glm.data.preprocess_shards import (
    UnitResult,
    done_path,
    open_shard_dir,
    plan_record,
    read_done,
    remove_stale_temporaries,
    shard_dir_for,
)
from megatron_glm.data.preprocess_summary import MAX_REPORTED, PreprocessSummary, Problem, check_usable
from megatron_glm.data.sources import SourceFile, WorkUnit, describe, plan_units
from megatron_glm.data.tokenizer import open_tokenizer, tokenizer_fingerprint
from megatron_glm.errors import DataError

# The run's options, result and shard folder are part of this entry point's API (re-exported).
__all__ = [
    "PreprocessConfig",
    "PreprocessSummary",
    "Problem",
    "output_prefix_for",
    "plan_chunks",
    "preprocess",
    "shard_dir_for",
]


def plan_chunks(paths: Sequence[str | SourceFile], chunk_bytes: int) -> list[WorkUnit]:
    """The work units of ``paths`` (see :func:`megatron_glm.data.sources.plan_units`)."""
    return plan_units(paths, chunk_bytes)


def preprocess(config: PreprocessConfig, log: Callable[[str], None] = print) -> PreprocessSummary:
    """Tokenize ``config.inputs`` into indexed datasets; returns what was done (and logs progress)."""
    config.validate()
    start = time.perf_counter()
    paths = expand_inputs(config.inputs)
    sources = _describe_sources(paths, config)
    keys = tuple(config.json_keys)
    tokenizer = open_tokenizer(config.tokenizer_model)  # fail early on a bad model
    dtype = best_dtype(tokenizer.vocab_size)
    summary = PreprocessSummary.for_outputs(
        {key: output_prefix_for(config.output_prefix, key, config.split_sentences) for key in keys}, len(paths)
    )
    chunks = plan_chunks(sources, config.chunk_bytes)
    total_bytes = sum(s.size for s in sources)
    remove_stale_temporaries(list(summary.outputs.values()))
    shard_dir, lock = open_shard_dir(config, plan_record(config, sources, keys), log)
    done = {c.index: r for c in chunks if (r := read_done(done_path(shard_dir, c.index)))}
    summary.resumed_units = len(done)
    log(
        f"preprocessing {len(paths)} file(s), {total_bytes / 1e6:,.1f} MB in {len(chunks)} unit(s) with "
        f"{config.workers} worker(s); tokenizer vocab {tokenizer.vocab_size} -> {dtype} tokens"
    )
    if done:
        log(f"resuming an interrupted run: {len(done)} of {len(chunks)} unit(s) already done in {shard_dir}")
    job = preprocess_worker.WorkerJob(
        tokenizer_model=config.tokenizer_model,
        keys=keys,
        split_sentences=config.split_sentences,
        append_eod=config.append_eod,
        strict=config.strict,
        shard_dir=shard_dir,
    )
    outputs = {key: IndexedDatasetBuilder(prefix, dtype) for key, prefix in summary.outputs.items()}
    try:
        with _unit_results(job, chunks, done, config.workers) as units:
            progress = _Progress(config.log_interval, start, total_bytes, log)
            _merge_units(units, summary, outputs, len(paths), config.strict, progress)
        check_usable(summary, paths, config.max_bad_fraction)
        _write_outputs(summary, outputs, config.tokenizer_model, tokenizer.vocab_size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise DataError(
                f"--output-prefix {config.output_prefix}: cannot write ({exc.strerror}); nothing was "
                f"written under the final names"
            ) from None
        raise
    finally:
        for builder in outputs.values():
            builder.abort()
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        if not interrupted:  # kept only when interrupted (Ctrl-C, or kill -9 never gets here): a rerun resumes
            shutil.rmtree(shard_dir, ignore_errors=True)
        lock.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _describe_sources(paths: Sequence[str], config: PreprocessConfig) -> list[SourceFile]:
    """The input files as stored; plain text takes only the key ``text``."""
    sources = [describe(path, config.input_format) for path in paths]
    keys = tuple(config.json_keys)
    texts_files = [s.path for s in sources if s.record_format == "text"]
    if texts_files and keys != ("text",):
        raise DataError(
            f"{texts_files[0]}: plain text holds one document a line (key 'text'); --json-keys "
            f"{' '.join(keys)} does not apply to it"
        )
    return sources


@contextlib.contextmanager
def _unit_results(
    job: preprocess_worker.WorkerJob, chunks: Sequence[WorkUnit], done: Mapping[int, UnitResult], workers: int
) -> Iterator[Iterator[tuple[WorkUnit, UnitResult]]]:
    """Every unit with its result, in input order: reused from ``done`` or processed now (in a pool when
    ``workers`` > 1). The pool is joined on a clean exit and terminated when the block raises."""
    todo = [c for c in chunks if c.index not in done]
    pool = None
    try:
        if workers == 1 or len(todo) <= 1:
            preprocess_worker.init_worker(job)
            fresh = map(preprocess_worker.process_chunk, todo)
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = context.Pool(
                min(workers, len(todo)), initializer=preprocess_worker.init_worker, initargs=(job, True)
            )
            fresh = pool.imap(preprocess_worker.process_chunk, todo, chunksize=1)
        yield zip(chunks, (done[c.index] if c.index in done else next(fresh) for c in chunks))
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        preprocess_worker.release_worker()


class _Progress:
    """A progress line every ``interval`` documents (checked as units finish)."""

    def __init__(self, interval: int, start: float, total_bytes: int, log: Callable[[str], None]) -> None:
        self.interval, self.start, self.total_bytes, self.log = interval, start, total_bytes, log
        self.next_log = interval

    def update(self, summary: PreprocessSummary) -> None:
        if summary.documents >= self.next_log:
            self.next_log = (summary.documents // self.interval + 1) * self.interval
            elapsed = time.perf_counter() - self.start
            self.log(f"{summary.rate_line(elapsed)} ({summary.bytes / max(self.total_bytes, 1):.0%})")


def _merge_units(
    units: Iterator[tuple[WorkUnit, UnitResult]],
    summary: PreprocessSummary,
    outputs: Mapping[str, IndexedDatasetBuilder],
    files: int,
    strict: bool,
    progress: _Progress,
) -> None:
    """Append each unit's shards to the outputs and its counts and bad lines (by file line) to ``summary``."""
    file_lines = [0] * files
    for chunk, result in units:
        for lineno, kind, message in result.problems:
            found = Problem(chunk.path, file_lines[chunk.file_index] + lineno, kind, message)
            if strict:
                raise DataError(f"{found} (--strict)")
            if len(summary.problems) < MAX_REPORTED:
                summary.problems.append(found)
        file_lines[chunk.file_index] += result.lines
        for key, builder in outputs.items():
            builder.add_index(result.shard_prefixes[key])
        summary.add(result)
        progress.update(summary)


def _write_outputs(
    summary: PreprocessSummary, outputs: Mapping[str, IndexedDatasetBuilder], tokenizer_model: str, vocab_size: int
) -> None:
    """Give the outputs their final names, each with its metadata sidecar."""
    fingerprint = tokenizer_fingerprint(tokenizer_model)
    for key, builder in outputs.items():
        with contextlib.suppress(FileNotFoundError):
            os.remove(meta_path(summary.outputs[key]))  # a sidecar of earlier outputs must not outlive them
        builder.finalize()
        write_dataset_meta(
            summary.outputs[key],
            vocab_size=vocab_size,
            max_token_id=summary.max_token_id[key],
            tokenizer_fingerprint=fingerprint,
        )
