"""Resuming must continue the same run: what it trains on and how is compared with the checkpoint's record.

:func:`run_identity` is stored in every checkpoint's ``meta.json`` (``identity``); :func:`identity_drift`
lists, one short phrase each, what differs on resume (the data by fingerprint, so a moved copy of the same
dataset resumes, the tokenizer by sha256, sequence length, global batch, seed and split). The trainer refuses
such a resume unless ``checkpoint.override_config`` (``--override-checkpoint-config``) is given.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_glm.data.dataset_meta import dataset_fingerprint
from megatron_glm.data.samples import parse_data_path

__all__ = ["identity_drift", "run_identity"]


def _tokenizer_sha256(path: str) -> str:
    """The tokenizer's fingerprint (a folder: its ``tokenizer.json``); "" when unreadable."""
    from megatron_glm.data.tokenizer import tokenizer_fingerprint
    from megatron_glm.errors import DataError

    try:
        return tokenizer_fingerprint(path) if path else ""
    except (DataError, OSError):
        return ""


def run_identity(cfg: Any, global_batch_size: int) -> dict[str, Any]:
    """What a resumed run must share with the run that saved (see the module docstring)."""
    d = cfg.data
    return {
        "data": [
            [weight, os.path.abspath(prefix), dataset_fingerprint(prefix)]
            for weight, prefix in parse_data_path(d.data_path)
        ],
        "tokenizer_sha256": _tokenizer_sha256(d.tokenizer_model),
        "seq_length": d.seq_length,
        "global_batch_size": int(global_batch_size),
        "seed": cfg.training.seed,
        "split": d.split,
    }


def _from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The comparable part of an older checkpoint that recorded only its config."""
    data, training = config.get("data", {}), config.get("training", {})
    out: dict[str, Any] = {}
    for key, value in (
        ("seq_length", data.get("seq_length")),
        ("seed", training.get("seed")),
        ("split", data.get("split")),
    ):
        if value is not None:
            out[key] = value
    return out


def _short(fingerprint: str) -> str:
    return fingerprint[:12]


def identity_drift(meta: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the checkpoint's ``meta`` and this run's :func:`run_identity` (empty: nothing)."""
    saved = meta.get("identity") or _from_config(meta.get("config", {}))
    out: list[str] = []
    if "data" in saved:
        was = [(float(w), fp) for w, _, fp in saved["data"]]
        now = [(float(w), fp) for w, _, fp in current["data"]]
        if was != now:
            old = ", ".join(f"{os.path.basename(p)} [{_short(fp)}]" for _, p, fp in saved["data"])
            new = ", ".join(f"{os.path.basename(p)} [{_short(fp)}]" for _, p, fp in current["data"])
            out.append(f"data (fingerprint): checkpoint {old}, now {new}")
    if saved.get("tokenizer_sha256") and current.get("tokenizer_sha256") != saved["tokenizer_sha256"]:
        out.append(
            f"tokenizer (sha256): checkpoint {_short(saved['tokenizer_sha256'])}, "
            f"now {_short(current.get('tokenizer_sha256') or 'unreadable')}"
        )
    for key, name in (
        ("seq_length", "seq length"),
        ("global_batch_size", "global batch"),
        ("seed", "seed"),
        ("split", "split"),
    ):
        if key in saved and saved[key] != current.get(key):
            out.append(f"{name}: checkpoint {saved[key]!r}, now {current.get(key)!r}")
    return out
