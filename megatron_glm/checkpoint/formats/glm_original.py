"""The original GLM checkpoint format (THUDM/GLM releases, FlagAI, Megatron-style loaders).

``<dir>/<iteration>/mp_rank_{t:02d}_model_states.pt`` holding ``{"module": state_dict}`` with the original key
names and tensor-parallel shards, plus ``<dir>/latest_checkpointed_iteration.txt`` (the original tracker) and
``<dir>/latest`` (DeepSpeed's). We also write ``config.json`` (our model fields), which the original code
ignores; without it the architecture is inferred from the tensor shapes (heads: ``hidden / 64``, the head size
of every published GLM, unless given).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.reshard import merge_shards, split_full
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.stream import SourceInfo, iter_layers
from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import ModelLayout, layer_index

from .common import model_config_from_dict

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG = "config.json"
RANK_RE = re.compile(r"^mp_rank_(\d\d)_model_states\.pt$")


def find_rank_dir(path: Path) -> Path | None:
    """The directory holding ``mp_rank_XX_model_states.pt`` files (following the trackers), or ``None``."""
    if any(RANK_RE.match(p.name) for p in path.glob("mp_rank_*_model_states.pt")):
        return path
    for tracker in (TRACKER, "latest"):
        f = path / tracker
        if f.is_file():
            sub = path / f.read_text(encoding="utf-8").strip()
            if sub.is_dir() and any(sub.glob("mp_rank_*_model_states.pt")):
                return sub
    return None


def _strip_module_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def rank_files(path: Path, kind: str) -> tuple[Path, list[Path]]:
    """The directory holding ``mp_rank_XX_model_states.pt`` under ``path`` and its files in rank order; a
    missing directory or rank is a one-line :class:`CheckpointError` (``kind`` names the format)."""
    rank_dir = find_rank_dir(path)
    if rank_dir is None:
        raise CheckpointError(f"{path}: not a {kind} checkpoint (no mp_rank_XX_model_states.pt)")
    ranks = sorted(int(m.group(1)) for p in rank_dir.iterdir() if (m := RANK_RE.match(p.name)))
    tp = max(ranks) + 1
    missing = [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp) if r not in ranks]
    if missing:
        raise CheckpointError(f"{rank_dir}: missing tensor-parallel ranks: {', '.join(missing)}")
    return rank_dir, [rank_dir / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]


class RankFilesSource:
    """What every model-only checkpoint stored as one state dict per tensor-parallel rank shares: the tensor
    names, no optimizer state, and a cache of loaded rank files (``_sds``) dropped by :meth:`release`."""

    _names: list[str]
    _sds: dict[int, dict[str, torch.Tensor]]

    def names(self) -> list[str]:
        return list(self._names)

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def module_tensor(self, name: str) -> torch.Tensor:
        return self.tensor(name)

    def optimizer_state(self, name: str) -> None:
        return None

    def release(self) -> None:
        self._sds.clear()


def rank_modules(
    src: Any,
    layout: ModelLayout,
    tp: int,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    convert: Callable[[str, torch.Tensor], tuple[str, torch.Tensor]] = lambda name, part: (name, part),
) -> Iterator[tuple[int, OrderedDict[str, torch.Tensor]]]:
    """``(rank, module)`` for each of ``tp`` ranks: every tensor of ``src`` transformed, split for the rank and
    passed through ``convert`` (a release's name and packing), one transformer layer in memory at a time."""
    for t in range(tp):
        module: OrderedDict[str, torch.Tensor] = OrderedDict()
        for _, run in iter_layers(src.names()):
            for name in run:
                key, part = convert(name, split_full(layout[name], transform(name, src.tensor(name)), t, tp))
                module[key] = part.clone()
            src.release()
        yield t, module


class GLMOriginalSource(RankFilesSource):
    """Original-format checkpoint files, read as full tensors."""

    def __init__(self, path: str | Path, *, num_attention_heads: int | None = None) -> None:
        path = Path(path)
        rank_dir, self.files = rank_files(path, "GLM")
        tp = len(self.files)
        self._sds: dict[int, dict[str, torch.Tensor]] = {}
        sd0 = self._sd(0)
        notes: list[str] = []
        config = self._config(path, rank_dir, sd0, tp, num_attention_heads, notes)
        self.layout = ModelLayout(config)
        self._names = self.layout.names()
        missing_t = [n for n in self._names if n not in sd0]
        if missing_t:
            raise CheckpointError(
                f"{self.files[0]}: not a GLM checkpoint ({len(missing_t)} GLM tensors missing, e.g. {missing_t[:3]})"
            )
        extra = [k for k in sd0 if k not in set(self._names)]
        if extra:
            notes.append(f"ignored {len(extra)} tensors that are not part of the GLM model: {extra[:4]}")
        tok = [str(p) for p in (path / "tokenizer.model", path / "tokenizer.vocab") if p.is_file()]
        self.info = SourceInfo(format="glm", path=str(rank_dir), config=config, tp=tp, tokenizer_files=tok, notes=notes)

    def _sd(self, t: int) -> dict[str, torch.Tensor]:
        if t not in self._sds:
            obj = safe_torch_load(self.files[t], mmap=True)
            if not isinstance(obj, dict):
                raise CheckpointError(f"{self.files[t]}: not a GLM checkpoint (not a dict)")
            sd = obj.get("module", obj)
            if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
                raise CheckpointError(f"{self.files[t]}: not a GLM checkpoint (no tensors under 'module')")
            self._sds[t] = _strip_module_prefix(sd)
        return self._sds[t]

    def _config(
        self, path: Path, rank_dir: Path, sd0: dict[str, torch.Tensor], tp: int, heads: int | None, notes: list[str]
    ) -> ModelConfig:
        for cand in (rank_dir / CONFIG, path / CONFIG):
            if cand.is_file():
                fields = json.loads(cand.read_text(encoding="utf-8"))
                if heads:
                    fields["num_attention_heads"] = heads
                return model_config_from_dict(fields, str(cand))
        if "word_embeddings.weight" not in sd0:
            raise CheckpointError(f"{self.files[0]}: not a GLM checkpoint (no word_embeddings.weight)")
        rows, hidden = sd0["word_embeddings.weight"].shape
        layers = {i for k in sd0 if (i := layer_index(k)) is not None}
        pos = sd0.get("transformer.position_embeddings.weight")
        if pos is None or not layers:
            raise CheckpointError(f"{self.files[0]}: not a GLM checkpoint (no position embeddings or layers)")
        if not heads:
            heads = max(1, hidden // 64)
            notes.append(
                f"no {CONFIG}: assumed {heads} attention heads (head size 64); pass "
                f"--num-attention-heads if that is wrong"
            )
        return ModelConfig(
            num_layers=max(layers) + 1,
            hidden_size=hidden,
            num_attention_heads=heads,
            vocab_size=rows * tp,
            max_sequence_length=pos.shape[0] - 1,
            block_position_encoding="transformer.block_position_embeddings.weight" in sd0,
        )

    def tensor(self, name: str) -> torch.Tensor:
        return merge_shards(self.layout[name], [self._sd(t)[name] for t in range(self.info.tp)])


def write_glm_original(
    src: Any,
    out: Path,
    tp: int,
    config: ModelConfig,
    *,
    iteration: int,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
) -> None:
    """Write ``out/<iteration>/mp_rank_XX_model_states.pt`` for ``tp`` ranks, the trackers and config.json."""
    tag = str(iteration)
    rank_dir = out / tag
    rank_dir.mkdir(parents=True, exist_ok=True)
    for t, module in rank_modules(src, ModelLayout(config), tp, transform):
        torch.save({"module": module}, rank_dir / f"mp_rank_{t:02d}_model_states.pt")
        del module
    (out / TRACKER).write_text(tag, encoding="utf-8")
    (out / "latest").write_text(tag, encoding="utf-8")
    (out / CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=1), encoding="utf-8")
