"""A preprocessing worker: reads one work unit straight from its file, tokenizes it and writes its shards.

Each unit becomes one shard dataset per key in the shard folder and a ``NNNNNN.done.json`` record
(:mod:`megatron_glm.data.preprocess_shards`); no token passes back to the parent. The same code runs in
the parent process (one worker) or in a pool of forked processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from megatron_glm.data.corpus import LineProblem
from megatron_glm.data.indexed_builder import IndexedDatasetBuilder
from megatron_glm.data.preprocess_encode import WorkerEncoder, encoded_records
from megatron_glm.data.preprocess_shards import UnitResult, done_path, write_json
from megatron_glm.data.preprocess_summary import MAX_REPORTED
from megatron_glm.data.sources import WorkUnit, iter_records

__all__ = ["WorkerJob", "init_worker", "process_chunk", "release_worker"]


@dataclass(frozen=True)
class WorkerJob:
    """What every work unit of a run is processed with (handed to each worker once)."""

    tokenizer_model: str
    keys: tuple[str, ...]
    split_sentences: bool
    append_eod: bool
    strict: bool
    shard_dir: str


#: The encoder of this worker process (set by ``init_worker``; one per process, never shared).
_WORKER: dict[str, object] = {}


def _die_with_parent() -> None:
    """Linux: a worker is killed when the parent dies (``kill -9`` leaves no orphan tokenizing on)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def init_worker(job: WorkerJob, in_pool: bool = False) -> None:
    if in_pool:
        _die_with_parent()
    _WORKER.update(job=job, encoder=WorkerEncoder.open(job.tokenizer_model, single_thread=in_pool))


def release_worker() -> None:
    """Drop this process's worker state (the parent's, when it ran the units itself)."""
    _WORKER.clear()


def process_chunk(chunk: WorkUnit) -> UnitResult:
    job: WorkerJob = _WORKER["job"]  # type: ignore[assignment]
    encoder: WorkerEncoder = _WORKER["encoder"]  # type: ignore[assignment]
    dtype = encoder.dtype
    eod = np.array([encoder.tokenizer.eos_id], dtype=dtype)
    keys, split, append_eod = job.keys, job.split_sentences, job.append_eod
    result = UnitResult(
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
    write_json(done_path(job.shard_dir, chunk.index), asdict(result))
    return result
