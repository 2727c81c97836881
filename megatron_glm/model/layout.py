"""The model layout: every tensor of a GLM model with ``ModelConfig``, described once.

For each tensor, by its original GLM state-dict name: the full shape, its role (which sets the weight
decay and the dtype it is kept in), how it is split over tensor-parallel ranks (dimension and the number of
packed blocks, e.g. 3 for the fused ``[Q; K; V]``), its initialisation, the transformer layer it belongs to
and the pipeline layer that holds it. The model is built to match it (a test checks every name, shape and
split against a built model), and everything that handles tensors without a model reads it: state-dict
conversion, the checkpoint formats, resharding, ZeRO consolidation, weights-only loading and the pipeline.

Pipeline layers (DeepSpeed ``PipelineModule`` order; their files hold the original names)::

    0        word embedding (tied)     word_embeddings.weight
    1        position embeddings       transformer.{position,block_position}_embeddings.weight
    2+i      transformer layer i       transformer.layers.{i}.*
    L+2      final LayerNorm           transformer.final_layernorm.*
    L+3      head (tied to layer 0)    (no tensors of its own: the word embedding's weight)

An architecture option is one more entry in :func:`embedding_tensors`, :func:`layer_tensors` or
:func:`final_tensors` (conditioned on its ``ModelConfig`` field) plus the module that owns the parameter.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError

ROLES = ("embedding", "weight", "bias", "norm")
INITS = ("normal", "scaled_normal", "ones", "zeros")
DTYPE_ROLES = ("params", "fp32")
PIPE_KINDS = ("word_embedding", "position_embeddings", "layer", "final_norm", "head")
LAYER_PREFIX = "transformer.layers.{}."
VOCAB_TENSOR = "word_embeddings.weight"
_LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.")
_PIPE_PREFIX_RE = re.compile(r"^(tied_modules\.[^.]+\.|\d+\.)")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model.

    ``role``: ``embedding`` / ``weight`` (decayed matrices), ``bias`` / ``norm`` (no weight decay).
    ``dtype``: ``params`` (the model's parameter dtype; cast on export) or ``fp32`` (always kept fp32).
    ``split_dim``: the dimension split over tensor-parallel ranks (``None``: replicated); ``blocks``: equal
    blocks packed along it, each split separately (rank ``r`` holds ``[Q_r; K_r; V_r]`` for 3).
    ``init``: ``normal`` N(0, init_std), ``scaled_normal`` N(0, init_std / sqrt(2 L)), ``ones``, ``zeros``.
    ``layer``: the transformer layer (``None`` for embeddings and the final norm); ``pipe_layer``: the
    pipeline layer whose file holds it.
    """

    name: str
    shape: tuple[int, ...]
    role: str
    split_dim: int | None = None
    blocks: int = 1
    init: str = "zeros"
    dtype: str = "params"
    layer: int | None = None
    pipe_layer: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES or self.init not in INITS or self.dtype not in DTYPE_ROLES:
            raise ValueError(
                f"{self.name}: role {self.role!r} / init {self.init!r} / dtype {self.dtype!r} not in "
                f"{ROLES} / {INITS} / {DTYPE_ROLES}"
            )

    @property
    def partition(self) -> tuple[int, int] | None:
        """``(dim, blocks)`` of the tensor-parallel split, or ``None`` when replicated."""
        return None if self.split_dim is None else (self.split_dim, self.blocks)

    @property
    def weight_decay(self) -> bool:
        return self.role in ("embedding", "weight")

    def shard_shape(self, tp_size: int) -> tuple[int, ...]:
        """The shape one of ``tp_size`` tensor-parallel ranks holds."""
        out = list(self.shape)
        if self.split_dim is not None and tp_size > 1:
            out[self.split_dim] //= tp_size
        return tuple(out)


@dataclass(frozen=True)
class PipeLayer:
    """One layer of the pipeline module: its kind, transformer layer index and the tensors its file holds."""

    index: int
    kind: str
    layer: int | None = None
    names: tuple[str, ...] = ()


def embedding_tensors(config: ModelConfig) -> list[TensorSpec]:
    """Pipe layers 0 and 1: the word embedding (vocab-parallel, tied head) and the position tables."""
    h, p = config.hidden_size, config.max_sequence_length + 1
    out = [
        TensorSpec(VOCAB_TENSOR, (config.vocab_size, h), "embedding", 0, init="normal", pipe_layer=0),
        TensorSpec("transformer.position_embeddings.weight", (p, h), "embedding", init="normal", pipe_layer=1),
    ]
    if config.block_position_encoding:
        out.append(
            TensorSpec("transformer.block_position_embeddings.weight", (p, h), "embedding", init="normal", pipe_layer=1)
        )
    return out


def layer_tensors(config: ModelConfig) -> list[TensorSpec]:
    """One transformer layer's tensors, named relative to ``transformer.layers.{i}.``, in module order."""
    h = config.hidden_size
    f = 4 * h
    return [
        TensorSpec("input_layernorm.weight", (h,), "norm", init="ones"),
        TensorSpec("input_layernorm.bias", (h,), "bias"),
        TensorSpec("attention.query_key_value.weight", (3 * h, h), "weight", 0, 3, init="normal"),
        TensorSpec("attention.query_key_value.bias", (3 * h,), "bias", 0, 3),
        TensorSpec("attention.dense.weight", (h, h), "weight", 1, init="scaled_normal"),
        TensorSpec("attention.dense.bias", (h,), "bias"),
        TensorSpec("post_attention_layernorm.weight", (h,), "norm", init="ones"),
        TensorSpec("post_attention_layernorm.bias", (h,), "bias"),
        TensorSpec("mlp.dense_h_to_4h.weight", (f, h), "weight", 0, init="normal"),
        TensorSpec("mlp.dense_h_to_4h.bias", (f,), "bias", 0),
        TensorSpec("mlp.dense_4h_to_h.weight", (h, f), "weight", 1, init="scaled_normal"),
        TensorSpec("mlp.dense_4h_to_h.bias", (h,), "bias"),
    ]


def final_tensors(config: ModelConfig) -> list[TensorSpec]:
    """Pipe layer L+2: the final LayerNorm."""
    h = config.hidden_size
    return [
        TensorSpec("transformer.final_layernorm.weight", (h,), "norm", init="ones"),
        TensorSpec("transformer.final_layernorm.bias", (h,), "bias"),
    ]


class ModelLayout:
    """Every tensor of a GLM model with ``config``, in state-dict order, and the pipeline layers."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        n = config.num_layers
        specs = list(embedding_tensors(config))
        for i in range(n):
            prefix = LAYER_PREFIX.format(i)
            specs += [
                dataclasses.replace(s, name=prefix + s.name, layer=i, pipe_layer=i + 2) for s in layer_tensors(config)
            ]
        specs += [dataclasses.replace(s, pipe_layer=n + 2) for s in final_tensors(config)]
        self.tensors: dict[str, TensorSpec] = {s.name: s for s in specs}
        first, positions, layer, final, head = PIPE_KINDS
        kinds = [first, positions, *[layer] * n, final, head]
        self.pipe_layers = [
            PipeLayer(
                index=k,
                kind=kind,
                layer=k - 2 if kind == "layer" else None,
                names=tuple(s.name for s in specs if s.pipe_layer == k and kind != "head"),
            )
            for k, kind in enumerate(kinds)
        ]

    def names(self) -> list[str]:
        """Every tensor name, in the model's state-dict order."""
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorSpec:
        spec = self.tensors.get(name)
        if spec is None:
            raise CheckpointError(f"{name}: not a tensor of this GLM model ({self.config.num_layers} layers)")
        return spec

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.tensors.values())

    @property
    def saved_pipe_layers(self) -> list[PipeLayer]:
        """The pipeline layers with a file of their own (every one but the tied head)."""
        return [p for p in self.pipe_layers if p.names]

    def init_std(self, name: str) -> float:
        """The standard deviation of a normally initialised tensor."""
        spec = self[name]
        if spec.init == "scaled_normal":
            return self.config.init_std / (2.0 * self.config.num_layers) ** 0.5
        if spec.init != "normal":
            raise ValueError(f"{name} is initialised to {spec.init}, not from a normal distribution")
        return self.config.init_std

    def param_groups(self, names: Iterable[str]) -> list[list[str]]:
        """AdamW groups of ``names`` (layout order kept): weight-decayed tensors, then the rest."""
        names = list(names)
        decay = [n for n in names if self[n].weight_decay]
        return [decay, [n for n in names if not self[n].weight_decay]]

    def check_names(self, names: Iterable[str], where: str) -> None:
        """Every tensor of the layout is present and nothing else (one-line :class:`CheckpointError`)."""
        have = set(names)
        missing = [n for n in self.tensors if n not in have]
        extra = [n for n in have if n not in self.tensors]
        if missing:
            raise CheckpointError(
                f"{where}: not a complete GLM checkpoint: {len(missing)} tensors missing, e.g. {missing[:3]}"
            )
        if extra:
            raise CheckpointError(
                f"{where}: {len(extra)} tensors that a GLM model does not have, e.g. {sorted(extra)[:3]}"
            )


def layer_index(name: str) -> int | None:
    """The transformer layer of tensor ``name`` (``None`` for embeddings and the final norm)."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def original_name(local_name: str) -> str:
    """The original name of a parameter of a ``GLMModel`` or of a pipeline stage (DeepSpeed prefixes a stage's
    parameters with their pipe layer index, ``{k}.``, or with ``tied_modules.{key}.``)."""
    return _PIPE_PREFIX_RE.sub("", local_name, count=1)
