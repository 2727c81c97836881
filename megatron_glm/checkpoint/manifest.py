"""A checkpoint's manifest: every file with its size and sha256, written last (it marks the step complete).

Files are hashed as they are written, by the rank that writes them (:func:`save_hashed`, used by our DeepSpeed
checkpoint engine and for the RNG files), so a save does not end with one rank reading every other rank's
files while they wait; only files written outside those paths (``meta.json``, DeepSpeed's recovery script) are
hashed when the manifest is made. Verification can likewise be shared out: ``share=(k, n)`` hashes every
``n``-th file from the ``k``-th.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.fileio import file_sha256

MANIFEST = "manifest.json"

Digest = dict[str, Any]
"""``{"size": bytes, "sha256": hex}`` of one file."""


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through it to ``stream``."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.sha, self.size = stream, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += view.nbytes
        self.stream.write(view)
        return view.nbytes

    def flush(self) -> None:
        self.stream.flush()


def save_hashed(obj: Any, path: str | os.PathLike[str], **kwargs: Any) -> Digest:
    """``torch.save(obj, path)``, hashing the bytes on their way to the file; returns their digest."""
    with open(path, "wb") as stream:
        writer = _HashingWriter(stream)
        torch.save(obj, writer, **kwargs)
        writer.flush()
    return {"size": writer.size, "sha256": writer.sha.hexdigest()}


def gather_digests(mine: dict[str, Digest]) -> dict[str, Digest]:
    """Every rank's digests of the files it wrote, merged (a path two ranks report differently is left out)."""
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged: dict[str, Digest] = {}
    clash: set[str] = set()
    for part in parts:
        for rel, digest in part.items():
            if merged.get(rel, digest) != digest:
                clash.add(rel)
            merged[rel] = digest
    return {rel: d for rel, d in merged.items() if rel not in clash}


def write_manifest(step_dir: Path, tag: str, hash_files: bool = True, known: dict[str, Digest] | None = None) -> None:
    """Record every file of a step directory (size, sha256); written last, it marks the checkpoint complete.

    ``known``: digests taken while writing (relative path -> digest); only the other files are read here.
    """
    from megatron_glm.checkpoint.manager import write_text_atomic

    known = known or {}
    files = {}
    for f in sorted(step_dir.rglob("*")):
        if not f.is_file() or f.name == MANIFEST:
            continue
        rel, size = str(f.relative_to(step_dir)), f.stat().st_size
        digest = known.get(rel)
        if digest is not None and digest["size"] == size:
            sha = digest["sha256"] if hash_files else ""
        else:
            sha = file_sha256(f) if hash_files else ""
        files[rel] = {"size": size, "sha256": sha}
    write_text_atomic(step_dir / MANIFEST, json.dumps({"tag": tag, "files": files}, indent=1))


def verify_checkpoint(path: str | Path, hash_files: bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """``None`` when the step directory matches its manifest, else the reason it does not.

    ``hash_files=False`` checks presence and sizes only; ``share=(k, n)`` hashes only files ``k, k+n, ...``
    (in manifest order), so ``n`` ranks verify one checkpoint together.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{path}: incomplete checkpoint (no {MANIFEST})"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return f"{manifest_path}: unreadable manifest"
    for i, (rel, info) in enumerate(files.items()):
        f = path / rel
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != info["size"]:
            return f"{f}: truncated or altered ({size} bytes, manifest says {info['size']})"
        mine = i % share[1] == share[0]
        if hash_files and mine and info.get("sha256") and file_sha256(f) != info["sha256"]:
            return f"{f}: corrupt (sha256 differs from the manifest)"
    return None
