"""GLM-130B's SwissArmyTransformer (SAT) checkpoint layout (format name ``sat``).

Files: ``<dir>/latest`` (the iteration tag), ``<dir>/<tag>/mp_rank_{t:02d}_model_states.pt`` holding
``{"module": state_dict, ...}`` (one file per tensor-parallel rank, as GLM-130B's release: 8 ranks) and
``<dir>/model_config.json`` with SAT's model arguments (``model_class: GLM130B``, ``num_layers``, ``hidden_size``,
``inner_hidden_size``, ``num_attention_heads``, ``vocab_size``, ``max_sequence_length``, ``layernorm_order:
post``, ``model_parallel_size``, ``layernorm_epsilon``, ``hidden_dropout``, ``attention_dropout``), which SAT's
``from_pretrained`` reads. GLM-130B's own scripts pass the same values as flags; without the file the shapes are
read from the tensors and the heads default to ``hidden / 128`` (GLM-130B's head size; ``--num-attention-heads``).

Tensors (SAT names; ours are the same but ``transformer.word_embeddings.weight`` -> ``word_embeddings.weight``):
``transformer.word_embeddings.weight`` (vocab-parallel), per layer ``transformer.layers.{i}.`` +
``input_layernorm``, ``attention.query_key_value`` (per rank ``[3 nh/tp hd, H]`` packed per head
``[q_h; k_h; v_h]``: converted to our ``[Q_r; K_r; V_r]``), ``attention.dense``, ``post_attention_layernorm``,
``mlp.dense_h_to_4h`` (GeGLU, per rank ``[W1_r; W2_r]``, ``2 inner / tp`` rows: exactly our rank's shard),
``mlp.dense_4h_to_h`` (weights and biases), ``transformer.final_layernorm``, and the buffer
``mixins.rotary-embedding.rotary_emb.inv_freq`` (``[hd / 2]``, computed in fp32 and cast to the weights' dtype,
as SAT does; checked on import, recomputed on export). Tied output, no position table (a
``transformer.position_embeddings.weight`` that a SAT build carries is ignored with a note).

The model is GLM-130B's architecture (rotary 1-D over the whole head, GeGLU ``x1 * gelu_erf(x2)`` with the exact
GeLU as GLM-130B's code, DeepNorm, LayerNorm, biases, tied head); exporting another architecture is a one-line
error naming the first option that differs. Our rotary uses exact fp32 frequencies, as SAT (the stored buffer is
checked, not used). Inference-time masks and positions (SAT freezes positions at ``[gMASK]``) are the caller's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.reshard import merge_shards
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.stream import SourceInfo
from megatron_glm.config import Architecture, ModelConfig
from megatron_glm.config.architecture import ArchitectureFamily
from megatron_glm.config.sizes import FAMILY_OPTIONS, MODEL_SIZES
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import VOCAB_TENSOR, ModelLayout, layer_index

from .glm_original import RankFilesSource, _strip_module_prefix, find_rank_dir, rank_files, rank_modules
from .packing import PRECISION_ONLY, ours_to_per_head, per_head_to_ours, rotary_inv_freq

MODEL_CONFIG = "model_config.json"
MODEL_CLASS = "GLM130B"
SAT_VOCAB = "transformer.word_embeddings.weight"
INV_FREQ = "mixins.rotary-embedding.rotary_emb.inv_freq"
_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")
#: GLM-130B's options (the named size minus its shapes): what a SAT GLM-130B model is.
GLM130B_OPTIONS = {k: v for k, v in MODEL_SIZES["glm-130b"].items() if k not in (*_SHAPE_KEYS, "ffn_hidden_size")}
#: What the layout holds: GLM-130B's options (DeepNorm and ChatGLM's post-LN alpha share the forward) with the
#: shapes model_config.json records; multi-head attention with head size hidden / heads.
GLM130B_ARCH = ArchitectureFamily(
    "sat",
    Architecture(**FAMILY_OPTIONS["glm-130b"]),
    recorded=frozenset({*_SHAPE_KEYS, "ffn_hidden_size", "layernorm_epsilon"}),
    alternatives={"residual_style": ("post_ln_alpha",), **PRECISION_ONLY},
)


def sat_name(name: str) -> str:
    return SAT_VOCAB if name == VOCAB_TENSOR else name


def _is_qkv(name: str) -> bool:
    return ".attention.query_key_value." in name


def check_sat_architecture(config: ModelConfig) -> None:
    """One-line error unless ``config`` is a model GLM-130B's SAT layout holds."""
    bad = GLM130B_ARCH.mismatch(config.architecture())
    if bad:
        raise CheckpointError(f"the sat (GLM-130B) layout cannot hold this model: {bad}")


def _model_config(path: Path, rank_dir: Path) -> tuple[dict[str, Any], Path] | None:
    for cand in (path / MODEL_CONFIG, rank_dir / MODEL_CONFIG):
        if cand.is_file():
            try:
                raw = json.loads(cand.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{cand}: cannot read SAT's model config ({exc})") from None
            if not isinstance(raw, dict):
                raise CheckpointError(f"{cand}: not a SAT model config (not a JSON object)")
            return raw, cand
    return None


def _load_module(file: Path) -> dict[str, torch.Tensor]:
    obj = safe_torch_load(file, mmap=True)
    sd = obj.get("module", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{file}: not a SAT checkpoint (no tensors under 'module')")
    return _strip_module_prefix(sd)


def is_sat(path: Path) -> bool:
    """A SAT checkpoint: ``mp_rank_XX_model_states.pt`` files with SAT's ``model_config.json`` or SAT's names."""
    rank_dir = find_rank_dir(path)
    if rank_dir is None:
        return False
    found = _model_config(path, rank_dir)
    if found is not None:
        return "model_class" in found[0]
    try:
        return SAT_VOCAB in _load_module(next(rank_dir.glob("mp_rank_00_model_states.pt")))
    except (CheckpointError, StopIteration):
        return False


class SATSource(RankFilesSource):
    """A SAT GLM-130B checkpoint read as full tensors by our names."""

    def __init__(self, path: str | Path, *, num_attention_heads: int | None = None) -> None:
        path = Path(path)
        rank_dir, self.files = rank_files(path, "SAT")
        tp = len(self.files)
        self._sds: dict[int, dict[str, torch.Tensor]] = {}
        notes: list[str] = []
        config = self._config(path, rank_dir, tp, num_attention_heads, notes)
        self.layout = ModelLayout(config)
        self._names = self.layout.names()
        self.tp = tp
        for t in range(tp):
            self._check_rank(t, config, notes if t == 0 else [])
        self.release()
        self.info = SourceInfo(format="sat", path=str(rank_dir), config=config, tp=tp, notes=notes)

    def _sd(self, t: int) -> dict[str, torch.Tensor]:
        if t not in self._sds:
            self._sds[t] = _load_module(self.files[t])
        return self._sds[t]

    def _config(self, path: Path, rank_dir: Path, tp: int, heads: int | None, notes: list[str]) -> ModelConfig:
        found = _model_config(path, rank_dir)
        if found is not None:
            raw, where = found
            if raw.get("model_class", MODEL_CLASS) != MODEL_CLASS:
                raise CheckpointError(f"{where}: model_class {raw['model_class']!r} is not supported ({MODEL_CLASS})")
            if raw.get("layernorm_order", "post") != "post":
                raise CheckpointError(f"{where}: layernorm_order {raw['layernorm_order']!r} (GLM-130B: 'post')")
            lacking = [k for k in _SHAPE_KEYS[:4] if k not in raw]
            if lacking:
                raise CheckpointError(f"{where}: SAT model config lacks {', '.join(lacking)}")
            if raw.get("model_parallel_size", tp) != tp:
                notes.append(f"{where.name}: model_parallel_size {raw['model_parallel_size']}, but {tp} rank files")
            hidden = int(raw["hidden_size"])
            fields = {
                "num_layers": int(raw["num_layers"]),
                "hidden_size": hidden,
                "num_attention_heads": int(heads or raw["num_attention_heads"]),
                "vocab_size": int(raw["vocab_size"]),
                "max_sequence_length": int(raw.get("max_sequence_length", 2048)),
                "ffn_hidden_size": int(raw.get("inner_hidden_size") or 4 * hidden),
                "layernorm_epsilon": float(raw.get("layernorm_epsilon", 1e-5)),
                "hidden_dropout": float(raw.get("hidden_dropout", 0.1)),
                "attention_dropout": float(raw.get("attention_dropout", 0.1)),
            }
        else:
            sd0 = self._sd(0)
            if SAT_VOCAB not in sd0 or "transformer.layers.0.mlp.dense_4h_to_h.weight" not in sd0:
                raise CheckpointError(f"{self.files[0]}: not a SAT GLM-130B checkpoint (no {SAT_VOCAB} or layers)")
            rows, hidden = sd0[SAT_VOCAB].shape
            if not heads:
                heads = max(1, hidden // 128)
                notes.append(f"no {MODEL_CONFIG}: assumed {heads} attention heads (head size 128, GLM-130B's)")
            fields = {
                "num_layers": max(i for k in sd0 if (i := layer_index(k)) is not None) + 1,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "vocab_size": rows * tp,
                "max_sequence_length": 2048,
                "ffn_hidden_size": sd0["transformer.layers.0.mlp.dense_4h_to_h.weight"].shape[1] * tp,
            }
        return ModelConfig(**{**GLM130B_OPTIONS, **fields})

    def _check_rank(self, t: int, config: ModelConfig, notes: list[str]) -> None:
        sd, where = self._sd(t), self.files[t]
        for spec in self.layout:
            name, want = sat_name(spec.name), spec.shard_shape(self.tp)
            if name not in sd:
                raise CheckpointError(f"{where}: missing tensor {name} (expected shape {list(want)})")
            if tuple(sd[name].shape) != want:
                raise CheckpointError(f"{where}: tensor {name} has shape {list(sd[name].shape)}, expected {list(want)}")
        if INV_FREQ in sd:
            want = rotary_inv_freq(config.head_dim, config.rotary_base, compute=torch.float32)
            have = sd[INV_FREQ]
            if have.shape != want.shape or not torch.allclose(have.float(), want, rtol=1e-3, atol=0.0):
                raise CheckpointError(
                    f"{where}: tensor {INV_FREQ} is not the rotary frequencies of head size {config.head_dim} and "
                    f"base {config.rotary_base:g} (expected shape {list(want.shape)})"
                )
        elif t == 0:
            notes.append(f"no {INV_FREQ}: it is derived from the rotary base (and written on export)")
        known = {sat_name(n) for n in self._names} | {INV_FREQ}
        extra = sorted(k for k in sd if k not in known)
        if extra:
            notes.append(f"ignored {len(extra)} tensors that are not part of the GLM-130B model: {extra[:4]}")

    def tensor(self, name: str) -> torch.Tensor:
        spec = self.layout[name]
        shards = [self._sd(t)[sat_name(name)] for t in range(self.tp)]
        if _is_qkv(name):
            heads = self.layout.config.num_attention_heads // self.tp
            shards = [per_head_to_ours(s, heads, sat_name(name)) for s in shards]
        return merge_shards(spec, shards)


def write_sat(
    src: Any,
    out: Path,
    tp: int,
    config: ModelConfig,
    *,
    iteration: int,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
) -> None:
    """Write ``out/<iteration>/mp_rank_XX_model_states.pt`` for ``tp`` ranks, ``out/latest`` and
    ``out/model_config.json`` (see the module docstring)."""
    check_sat_architecture(config)
    tag = str(iteration)
    rank_dir = out / tag
    rank_dir.mkdir(parents=True, exist_ok=True)
    heads = config.num_attention_heads // tp

    def to_sat(name: str, part: torch.Tensor) -> tuple[str, torch.Tensor]:
        return sat_name(name), ours_to_per_head(part, heads, name) if _is_qkv(name) else part

    for t, module in rank_modules(src, ModelLayout(config), tp, transform, to_sat):
        dtype = next(iter(module.values())).dtype
        module[INV_FREQ] = rotary_inv_freq(config.head_dim, config.rotary_base, compute=torch.float32).to(dtype)
        torch.save({"module": module, "iteration": iteration}, rank_dir / f"mp_rank_{t:02d}_model_states.pt")
        del module
    (out / "latest").write_text(tag, encoding="utf-8")
    sat_args = {
        "model_class": MODEL_CLASS,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "inner_hidden_size": config.ffn_size,
        "num_attention_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "max_sequence_length": config.max_sequence_length,
        "layernorm_order": "post",
        "layernorm_epsilon": config.layernorm_epsilon,
        "hidden_dropout": config.hidden_dropout,
        "attention_dropout": config.attention_dropout,
        "model_parallel_size": tp,
    }
    (out / MODEL_CONFIG).write_text(json.dumps(sat_args, indent=1), encoding="utf-8")
