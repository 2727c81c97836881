"""The shard folder of a preprocessing run: what survives a kill, so that a rerun resumes.

``{output_prefix}.shards/`` holds ``plan.json`` (the inputs and options the shards depend on), one shard
dataset per finished work unit and key, and a ``NNNNNN.done.json`` record per finished unit. A rerun with
the same plan reuses the finished units; a changed plan empties the folder first.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_glm.data.indexed_dataset import bin_path, idx_path
from megatron_glm.data.preprocess_config import PreprocessConfig
from megatron_glm.data.preprocess_summary import RecordCounts
from megatron_glm.data.sources import SourceFile
from megatron_glm.data.tokenizer import tokenizer_fingerprint
from megatron_glm.errors import DataError
from megatron_glm.locking import LockBusy, acquire_lock, pid_alive

__all__ = [
    "UnitResult",
    "done_path",
    "open_shard_dir",
    "plan_record",
    "read_done",
    "remove_stale_temporaries",
    "shard_dir_for",
    "write_json",
]


@dataclass
class UnitResult(RecordCounts):
    """What a finished work unit wrote (its ``NNNNNN.done.json``)."""

    index: int
    shard_prefixes: dict[str, str]
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    """(line number within the unit, kind, message) for the first few bad lines."""


def shard_dir_for(output_prefix: str) -> str:
    """Where the shards of an unfinished run live (kept after a kill so that a rerun resumes)."""
    return os.path.abspath(output_prefix) + ".shards"


def done_path(shard_dir: str, index: int) -> str:
    """The record of finished work unit ``index``."""
    return os.path.join(shard_dir, f"{index:06d}.done.json")


def write_json(path: str, record: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(record, out)
    os.replace(tmp, path)


def read_done(path: str) -> UnitResult | None:
    try:
        with open(path, encoding="utf-8") as stream:
            record = json.load(stream)
        result = UnitResult(**record)
    except (OSError, ValueError, TypeError):
        return None
    if not all(os.path.isfile(bin_path(p)) and os.path.isfile(idx_path(p)) for p in result.shard_prefixes.values()):
        return None
    result.problems = [tuple(p) for p in result.problems]  # type: ignore[misc]
    return result


def plan_record(config: PreprocessConfig, sources: Sequence[SourceFile], keys: Sequence[str]) -> dict[str, Any]:
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


def remove_stale_temporaries(final_prefixes: Sequence[str]) -> None:
    """Remove ``{final}.bin.tmpPID*`` / ``.idx.tmpPID`` files of writers that are no longer running."""
    for prefix in final_prefixes:
        for path in glob.glob(glob.escape(prefix) + ".bin.tmp*") + glob.glob(glob.escape(prefix) + ".idx.tmp*"):
            digits = path.rsplit(".tmp", 1)[1].split(".")[0]
            if digits.isdigit() and not pid_alive(int(digits)):
                with contextlib.suppress(OSError):
                    os.remove(path)


def open_shard_dir(config: PreprocessConfig, plan: dict[str, Any], log: Callable[[str], None]) -> tuple[str, Any]:
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
        write_json(plan_file, plan)
    else:  # same plan: drop what an interrupted writer left half-done
        for name in os.listdir(shard_dir):
            if ".tmp" in name:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(shard_dir, name))
    return shard_dir, lock
