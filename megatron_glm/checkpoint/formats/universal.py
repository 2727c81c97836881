"""DeepSpeed's universal checkpoint, written from our full-tensor stream, so a run of another layout can resume.

Layout (DeepSpeed 0.19's ``checkpoint.load_universal``; the same files ``deepspeed.checkpoint.ds_to_universal``
writes)::

    global_stepN/  zero/<name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt  {"param": full fp32 tensor, "cat_dim": d, ...}
                   zero/<name>/step.pt                              the optimizer step count
                   zero/optimizer_state.pt                          loss scaler, clip, param_groups, version
                   mp_rank_00_model_states.pt                       LR scheduler, step counters (no weights)
                   meta.json, manifest.json                         ours (meta says ``"format": "universal"``)

DeepSpeed's engine cuts every full tensor for the loading run's tensor-parallel rank (``cat_dim``; fused
QKV as ``param_n_sub_params`` packed blocks; the word embedding re-padded), and its ZeRO-1/2 optimizer
(fp32 or bf16) partitions it over the loading run's data-parallel ranks. ``<name>`` is the original GLM
name, which is also what a run without pipelining calls its parameters; pipeline runs cannot load it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.manager import LATEST, META, write_manifest
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.stream import SourceInfo
from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import VOCAB_TENSOR, ModelLayout

from .common import model_config_from_dict, tokenizer_files

UNIVERSAL = "universal"
STATE_FILES = {"fp32": "fp32", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def is_universal(meta: dict[str, Any]) -> bool:
    """True for the ``meta.json`` of a universal checkpoint."""
    return meta.get("format") == UNIVERSAL


def _save(obj: Any, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    torch.save(obj, part)
    os.replace(part, path)


def _slicing(layout: ModelLayout, name: str) -> dict[str, Any]:
    """How DeepSpeed cuts the full tensor for a tensor-parallel rank (its universal-checkpoint keys)."""
    spec = layout[name]
    keys: dict[str, Any] = {"cat_dim": spec.split_dim or 0}
    if spec.split_dim is not None and spec.blocks > 1:
        keys["param_n_sub_params"] = spec.blocks  # [q; k; v]: rank r takes [q_r; k_r; v_r]
    if name == VOCAB_TENSOR:
        keys["vocab_tensor"] = True  # zero rows appended up to the loading run's padded vocabulary
    return keys


def write_universal(
    src: Any, out: Path, config: ModelConfig, *, transform: Callable[[str, torch.Tensor], torch.Tensor]
) -> dict[str, Any]:
    """Write ``src`` (a source with ZeRO-1/2 optimizer state) as a universal checkpoint ``out/<tag>/``."""
    meta = copy.deepcopy(getattr(src.info, "meta", {}) or {})
    step_no = int(meta.get("step", 0))
    tag = f"global_step{step_no}"
    step = out / tag
    zero = step / "zero"
    zero.mkdir(parents=True, exist_ok=True)
    layout = ModelLayout(config)
    global_state, step_count = src.zero_globals()
    for name in src.names():
        state = src.optimizer_state(name)
        if state is None:
            raise CheckpointError(f"{src.info.path}: no optimizer state for {name}")
        folder = zero / name
        folder.mkdir(exist_ok=True)
        keys = _slicing(layout, name)
        for key, file in STATE_FILES.items():
            full = transform(name, state[key]).to(torch.float32).contiguous()
            _save({"param": full, **keys}, folder / f"{file}.pt")
        _save(step_count, folder / "step.pt")
        src.release()
    _save(global_state, zero / "optimizer_state.pt")
    extras = dict(src.model_extras())
    extras.update({"module": None, "optimizer": None, "mp_world_size": 1, "dp_world_size": 1})
    extras.setdefault("global_steps", step_no)
    extras.setdefault("skipped_steps", 0)
    extras.setdefault("buffer_names", [])
    _save(extras, step / "mp_rank_00_model_states.pt")
    info = src.info
    meta.setdefault("step", step_no)
    meta.setdefault("consumed_samples", 0)
    meta["format"] = UNIVERSAL
    meta["layout"] = {"universal": True}
    meta["weights_only"] = False
    meta.setdefault("config", {})["model"] = {**meta.get("config", {}).get("model", {}), **dataclasses.asdict(config)}
    meta["converted_from"] = {
        "path": info.path,
        "format": info.format,
        "tp": info.tp,
        "pp": info.pp,
        "dp": info.dp,
        "zero_stage": info.zero_stage,
    }
    (step / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), encoding="utf-8")
    write_manifest(step, tag)
    (out / LATEST).write_text(tag, encoding="utf-8")
    return meta


class UniversalSource:
    """A universal checkpoint read back as full tensors (for verification and further conversion)."""

    def __init__(self, step: Path, meta: dict[str, Any]) -> None:
        self.step = step
        config = model_config_from_dict((meta.get("config") or {}).get("model") or {}, str(step / META))
        tok = ((meta.get("config") or {}).get("data") or {}).get("tokenizer_model")
        self.info = SourceInfo(
            format=UNIVERSAL, path=str(step), config=config, meta=meta, tokenizer_files=tokenizer_files(tok)
        )
        self.info.zero_stage = int((meta.get("converted_from") or {}).get("zero_stage", 1))
        missing = [n for n in self.info.layout.names() if not (step / "zero" / n / "fp32.pt").is_file()]
        if missing:
            raise CheckpointError(f"{step}: universal checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def names(self) -> list[str]:
        return self.info.layout.names()

    def release(self) -> None:
        """Nothing is kept open."""

    def _load(self, name: str, key: str) -> torch.Tensor:
        return safe_torch_load(self.step / "zero" / name / f"{key}.pt")["param"]

    def tensor(self, name: str) -> torch.Tensor:
        return self._load(name, "fp32")

    module_tensor = tensor

    def optimizer_state(self, name: str) -> dict[str, torch.Tensor]:
        return {key: self._load(name, file) for key, file in STATE_FILES.items()}

    def optimizer_note(self) -> str | None:
        return None

    def zero_globals(self) -> tuple[dict[str, Any], Any]:
        state = safe_torch_load(self.step / "zero" / "optimizer_state.pt")
        return state, safe_torch_load(self.step / "zero" / self.names()[0] / "step.pt")

    def model_extras(self) -> dict[str, Any]:
        extras = safe_torch_load(self.step / "mp_rank_00_model_states.pt")
        return {k: v for k, v in extras.items() if k != "module"}
