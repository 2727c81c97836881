"""Atomic, verified, resumable training checkpoints around DeepSpeed's engine.

Layout under the save directory (DeepSpeed's own files inside each step directory)::

    global_step200/  mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...
                     rng/rank00000.pt ...   per-rank RNG states (torch, CUDA, python, TP tracker)
                     meta.json              step, consumed samples, layout, the run's config
                     manifest.json          every file with its size and sha256; written last
    latest           the newest complete step directory's name (updated after the rename)

A checkpoint is written to ``.tmp.<tag>`` and renamed when every rank has finished, so a directory named
``global_step*`` is complete or absent. Loading verifies the manifest and falls back to older checkpoints
when the newest is incomplete or corrupt.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.checkpoint.experts import load_expert_shards, save_expert_shards
from megatron_glm.checkpoint.finite import nonfinite_parts
from megatron_glm.checkpoint.layout import check_resumable
from megatron_glm.checkpoint.lora import frozen_excluded
from megatron_glm.checkpoint.manifest import Digest, gather_digests, save_hashed, verify_checkpoint, write_manifest
from megatron_glm.checkpoint.safe_load import check_data_files, safe_torch_load
from megatron_glm.errors import CheckpointError
from megatron_glm.locking import DirLock, LockBusy, acquire_lock

TAG_RE = re.compile(r"^global_step(\d+)$")
LATEST = "latest"
LOCK = ".lock"
META = "meta.json"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _broadcast_object(obj: Any) -> Any:
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _all_ok(ok: bool) -> bool:
    if not _dist():
        return ok
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_checkpoint(path: Path) -> None:
    """Delete a step directory as atomically as it was written: renamed out of ``global_step*`` first.

    A kill during the deletion leaves a ``.trash.*`` folder (removed by the next save), never a half-deleted
    checkpoint under its final name.
    """
    trash = path.with_name(f".trash.{path.name}.{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(directory: Path) -> list[str]:
    """Remove ``.trash.*`` folders of interrupted deletions and ``.tmp.*`` folders of interrupted saves."""
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if p.is_dir() and (p.name.startswith(".trash.") or p.name.startswith(".tmp.global_step")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def check_save_dir(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove it is writable; :class:`CheckpointError` in one line if not."""
    directory = Path(directory)
    probe = directory / f".write-test.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"--save {directory}: cannot write there ({exc.strerror or exc})") from None
    return directory


def lock_save_dir(directory: Path, log: Callable[[str], None] = print) -> DirLock | None:
    """Global rank 0 locks ``--save`` for this run (released at exit); every rank raises the refusal in one line
    naming the holder when another run uses it. A killed run's stale lock is taken over with a warning."""
    lock, refusal = None, ""
    if _rank() == 0:
        try:
            lock = acquire_lock(directory / LOCK, log)
        except LockBusy as exc:
            refusal = f"--save {directory}: another training run is using it ({exc})"
        except OSError as exc:
            refusal = f"--save {directory}: cannot create its lock file ({exc.strerror or exc})"
    refusal = _broadcast_object(refusal)
    if refusal:
        raise CheckpointError(refusal)
    if lock is not None:
        atexit.register(lock.release)
    return lock


def _is_disk_full(exc: BaseException, directory: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:  # torch's C++ writer says only "file write failed": ask the file system
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def tag_for(step: int) -> str:
    return f"global_step{step}"


def list_checkpoints(directory: str | Path) -> list[str]:
    """Complete-looking step directories, newest first (``latest`` first when it names one)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    tags = sorted(
        (p.name for p in directory.iterdir() if p.is_dir() and TAG_RE.match(p.name)),
        key=lambda t: int(TAG_RE.match(t).group(1)),
        reverse=True,
    )
    latest = directory / LATEST
    if latest.is_file():
        named = latest.read_text(encoding="utf-8").strip()
        if named in tags:
            tags.remove(named)
            tags.insert(0, named)
    return tags


def _latest_problem(directory: Path, tags: list[str]) -> str:
    """Why ``latest`` cannot be followed (missing, or naming an absent checkpoint), or ``""``."""
    if not tags:
        return ""
    latest = directory / LATEST
    if not latest.is_file():
        return f"{latest} is missing; using the newest complete checkpoint, {tags[0]}"
    named = latest.read_text(encoding="utf-8").strip()
    if named not in tags:
        return f"{latest} names {named!r}, which is not a complete checkpoint; using {tags[0]}"
    return ""


def verified_checkpoints(
    directory: Path,
    log: Callable[[str], None],
    problems: list[str] | None = None,
    verify: Callable[[Path], str | None] = verify_checkpoint,
    bad: set[str] | None = None,
) -> Iterator[str]:
    """The checkpoints of ``directory`` that match their manifests, newest first (``latest``'s first), each
    verified only when reached. Every one skipped is said (and why), as is the one used instead; every rank of
    a job iterates alike (rank 0 lists, ``verify`` may be collective)."""
    tags = _broadcast_object(list_checkpoints(directory) if _rank() == 0 else None)
    note = _latest_problem(directory, tags) if _rank() == 0 else ""
    if note:
        log(f"warning: {note}")
    for i, tag in enumerate(tags):
        reason = verify(directory / tag)
        if reason is None:
            if i:
                log(f"warning: using checkpoint {tag} (step {TAG_RE.match(tag).group(1)}) instead")
            yield tag
            continue
        log(f"warning: skipping checkpoint {tag}: {reason}")
        if problems is not None:
            problems.append(reason)
        if bad is not None:
            bad.add(tag)


def _verify_together(path: Path) -> str | None:
    """:func:`verify_checkpoint` with the hashing shared out over every rank; the reason the first rank found."""
    reason = verify_checkpoint(path, share=(_rank(), _world()))
    if not _dist():
        return reason
    reasons: list[Any] = [None] * _world()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a step directory."""
    meta_path = Path(path) / META
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: cannot read checkpoint metadata ({exc})") from None


class CheckpointManager:
    """Saves and restores a DeepSpeed engine plus our run state, atomically and verifiably."""

    def __init__(
        self, save_dir: str | Path, keep_last: int = 0, hash_files: bool = True, log: Callable[[str], None] = print
    ) -> None:
        self.save_dir = Path(save_dir) if save_dir else None
        self.keep_last = keep_last
        self.hash_files = hash_files
        self.log = log
        self.bad_tags: set[str] = set()
        """Checkpoints found corrupt while loading (never counted as kept when pruning)."""

    # ------------------------------------------------------------------ save
    def save(self, engine: Any, step: int, meta: dict[str, Any], rng_state: dict[str, Any]) -> Path:
        """Write checkpoint ``global_step{step}``; every rank calls this."""
        if self.save_dir is None:
            raise CheckpointError("no save directory configured (--save)")
        self.require_finite(engine, step)
        tag = tag_for(step)
        tmp_tag = f".tmp.{tag}"
        tmp = self.save_dir / tmp_tag
        final = self.save_dir / tag
        if _rank() == 0:
            check_save_dir(self.save_dir)
            remove_leftovers(self.save_dir)
        _barrier()
        error: BaseException | None = None
        written = getattr(getattr(engine, "checkpoint_engine", None), "written", None)
        if written is not None:
            written.clear()
        digests: dict[str, Digest] = {}
        try:
            engine.save_checkpoint(  # LoRA: the adapters only (the frozen base is its own checkpoint)
                str(self.save_dir), tag=tmp_tag, client_state={}, save_latest=False, **frozen_excluded(engine)
            )
            rng_dir = tmp / "rng"
            rng_dir.mkdir(parents=True, exist_ok=True)
            part = rng_dir / f".rank{_rank():05d}.pt.part"
            digests[f"rng/rank{_rank():05d}.pt"] = save_hashed(rng_state, part)
            os.replace(part, rng_dir / f"rank{_rank():05d}.pt")
            digests.update(
                save_expert_shards(getattr(engine, "module", None), tmp)
            )  # expert parallelism: each rank's experts
            for path, digest in (written or {}).items():  # hashed by this rank as it wrote them
                if Path(path).is_relative_to(tmp):
                    digests[str(Path(path).relative_to(tmp))] = digest
        except (OSError, RuntimeError) as exc:
            error = exc
        if _all_ok(error is None):
            digests = gather_digests(digests)
            if _rank() == 0:
                try:
                    write_text_atomic(tmp / META, json.dumps(meta, indent=1, sort_keys=True, default=str))
                    write_manifest(tmp, tag, hash_files=self.hash_files, known=digests)
                except OSError as exc:
                    error = exc
        if not _all_ok(error is None):
            self._fail_save(tag, tmp, error)
        if _rank() == 0:
            if final.exists():
                remove_checkpoint(final)
            os.replace(tmp, final)
            write_text_atomic(self.save_dir / LATEST, tag)
            self._prune()
        _barrier()
        return final

    def require_finite(self, engine: Any, step: int) -> None:
        """Stop the run (one line naming the step) when any rank's weights or optimizer state hold NaN or inf:
        nothing is written and nothing pruned, so ``latest`` stays on the last finite checkpoint."""
        bad = nonfinite_parts(engine, _all_ok)
        if not bad:
            return
        previous = list_checkpoints(self.save_dir) if self.save_dir is not None else []
        kept = f"latest stays on {previous[0]}" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"step {step}: the {' and '.join(bad)} hold NaN or inf; not saving {tag_for(step)} and removing no "
            f"checkpoint ({kept}); lower the learning rate or check the data, then resume"
        )

    def _fail_save(self, tag: str, tmp: Path, error: BaseException | None) -> None:
        """Remove the partial checkpoint and raise one line that says why (the disk is full, ...)."""
        assert self.save_dir is not None
        full = error is not None and _is_disk_full(error, self.save_dir)
        _barrier()
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        previous = list_checkpoints(self.save_dir)
        kept = f"the previous checkpoint {previous[0]} is intact" if previous else "no earlier checkpoint exists"
        if full:
            reason = "the disk is full (no space left on device)"
        elif error is not None:
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        else:
            reason = "another rank failed to write its part"
        raise CheckpointError(
            f"cannot save checkpoint {tag} in {self.save_dir}: {reason}; removed the partial {tmp.name}, {kept}"
        )

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints that verify; a corrupt one never counts as kept.

        Verification here checks presence and sizes (hashing every kept checkpoint at each save would cost
        as much as writing it); checkpoints already found corrupt while loading are known bad.
        """
        if self.keep_last <= 0 or self.save_dir is None:
            return
        tags = sorted(list_checkpoints(self.save_dir), key=lambda t: int(TAG_RE.match(t).group(1)), reverse=True)
        good = [
            t for t in tags if t not in self.bad_tags and verify_checkpoint(self.save_dir / t, hash_files=False) is None
        ]
        keep = set(good[: self.keep_last])
        oldest_kept = min((int(TAG_RE.match(t).group(1)) for t in keep), default=0)
        for old in tags:
            if old in keep:
                continue
            if old in good or int(TAG_RE.match(old).group(1)) < oldest_kept or old in self.bad_tags:
                if old not in good:
                    self.log(f"removing corrupt checkpoint {old}")
                remove_checkpoint(self.save_dir / old)

    # ------------------------------------------------------------------ load
    def load(
        self, engine: Any, load_dir: str | Path, expect: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Restore the newest usable checkpoint of ``load_dir`` into ``engine``.

        Returns ``(meta, rng_state)``, or ``None`` when the directory holds no checkpoint at all.
        ``expect`` maps layout keys (``tp``, ``pp``, ``dp``, ...) to this run's values; a checkpoint with a
        different layout is rejected with a clear message.
        """
        load_dir = Path(load_dir)
        candidates: list[str] = []
        problems: list[str] = []
        for tag in verified_checkpoints(load_dir, self.log, problems, verify=_verify_together, bad=self.bad_tags):
            candidates.append(tag)
            path = load_dir / tag
            meta = read_meta(path)
            universal = check_resumable(engine, path, meta, expect)
            error = ""
            rng_state: dict[str, Any] = {}
            try:
                if universal:  # DeepSpeed unpickles zero/ unrestricted: every file is read as data first
                    check_data_files(path / "zero")
                    engine._config.load_universal_checkpoint = True  # a (private) flag DeepSpeed reads at load
                loaded, _ = engine.load_checkpoint(
                    str(load_dir),
                    tag=tag,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                    load_module_strict=not frozen_excluded(engine),
                )
                if loaded is None:
                    raise CheckpointError(f"{path}: DeepSpeed could not load it")
                load_expert_shards(getattr(engine, "module", None), path)
                rng_file = path / "rng" / f"rank{_rank():05d}.pt"
                if rng_file.is_file():
                    rng_state = safe_torch_load(rng_file)
            except (CheckpointError, RuntimeError, KeyError, ValueError, OSError, AssertionError) as exc:
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            finally:
                if universal:
                    engine._config.load_universal_checkpoint = False
            if _all_ok(not error):
                return meta, rng_state
            self.bad_tags.add(tag)
            self.log(f"warning: checkpoint {tag} failed to load ({error or 'on another rank'}); trying an older one")
        if candidates:
            raise CheckpointError(f"no checkpoint in {load_dir} could be loaded (tried {', '.join(candidates)})")
        if problems:
            raise CheckpointError(f"no usable checkpoint in {load_dir}: " + "; ".join(problems))
        return None
