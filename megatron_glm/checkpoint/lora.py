"""LoRA runs and their checkpoints: the base model's identity, and the record a resume is checked against.

A LoRA run's checkpoints hold the adapters (and their optimizer state) only: the engine saves its trainable
parameters (``exclude_frozen_parameters``, :class:`~megatron_glm.checkpoint.manager.CheckpointManager` does it
when the model has frozen ones). The frozen base comes from its own checkpoint at every start, and
``meta.json`` records (``lora``) the adapters' settings and the base's identity: the sha256 of the base
checkpoint's manifest (``manifest.json``, which lists every file's sha256; for a checkpoint without one, e.g. a
HuggingFace folder, the same listing made on the spot). A resume against another base, or with other adapter
settings, is refused (:func:`check_lora_resume`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from megatron_glm.checkpoint.manifest import MANIFEST
from megatron_glm.config import LoraConfig
from megatron_glm.errors import CheckpointError
from megatron_glm.fileio import file_sha256


def frozen_excluded(engine: Any) -> dict[str, bool]:
    """``{"exclude_frozen_parameters": True}`` when the engine's model has frozen parameters (a LoRA run: its
    checkpoints hold the adapters only), else nothing. The MoE routers' correction biases (``router.expert_bias``:
    never trained by gradient, moved after each step) are part of the model's state, not a frozen base."""
    module = getattr(engine, "module", None)
    frozen = module is not None and any(
        not p.requires_grad and not n.endswith("router.expert_bias") for n, p in module.named_parameters()
    )
    return {"exclude_frozen_parameters": True} if frozen else {}


def base_identity(path: str | Path) -> str:
    """The sha256 of checkpoint ``path``'s weights manifest (a step directory's ``manifest.json``; else the
    ``{relative path: [size, sha256]}`` listing of its files, as JSON; a single file: its own sha256)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    manifest = path / MANIFEST
    if manifest.is_file():
        return file_sha256(manifest)
    files = {
        str(f.relative_to(path)): [f.stat().st_size, file_sha256(f)] for f in sorted(path.rglob("*")) if f.is_file()
    }
    if not files:
        raise CheckpointError(f"{path}: no files to identify the LoRA base by")
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def lora_record(lora: LoraConfig, base_path: str | Path, base_sha256: str) -> dict[str, Any]:
    """What ``meta.json`` records of a LoRA run (``lora``): the adapters' settings and the base's identity."""
    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "targets": lora.target_names(),
        "base": str(base_path),
        "base_sha256": base_sha256,
    }


def check_lora_resume(meta: dict[str, Any], record: dict[str, Any], path: str | Path) -> None:
    """Refuse (one line) to resume checkpoint ``path`` (its ``meta``) with this run's LoRA ``record`` (empty: no
    LoRA) when the base or the adapters differ."""
    saved = meta.get("lora") or {}
    if not saved and not record:
        return
    if not saved:
        raise CheckpointError(f"{path}: holds no LoRA adapters (a full model); resume it without --lora-rank")
    if not record:
        raise CheckpointError(
            f"{path}: holds LoRA adapters (rank {saved['rank']}) for base {saved['base']}; resume with "
            f"--lora-rank {saved['rank']}, or merge them first (tools/convert_checkpoint.py --merge-lora)"
        )
    if saved["base_sha256"] != record["base_sha256"]:
        raise CheckpointError(
            f"{path}: its LoRA adapters were trained on base {saved['base']} (manifest sha256 "
            f"{saved['base_sha256'][:12]}), not on {record['base']} ({record['base_sha256'][:12]}); resume against "
            "the same base"
        )
    for key in ("rank", "alpha", "targets"):
        if saved[key] != record[key]:
            raise CheckpointError(f"{path}: saved with lora {key} {saved[key]!r} but this run has {record[key]!r}")
