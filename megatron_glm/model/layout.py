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
                                       (rotary models: no tensors; the layer only applies embedding dropout)
    2+i      transformer layer i       transformer.layers.{i}.*
    L+2      final norm                transformer.final_layernorm.*
    L+3      head                      tied: no tensors of its own (the word embedding's weight);
                                       untied: output_layer.weight [V, H], vocab-parallel

A layer's tensors are collected from the builders of its parts (``megatron_glm.model.builders``: each declares its
tensors and builds its module from the same declarations), so a layer option is a builder or a declaration there;
an option outside the layers is one more entry in :func:`embedding_tensors`, :func:`final_tensors` or
:func:`head_tensors` (conditioned on its ``ModelConfig`` field) plus the module that owns the parameter.

Packed tensors and the released layouts:

- ``attention.query_key_value`` is ``[Q; K; V]`` over the rows: all query heads (``nh x hd`` rows, head-major),
  then the keys of every key/value group (``g x hd``), then the values (``g x hd``); ``g = nh`` without
  grouped-query attention. Tensor-parallel rank ``r`` holds ``[Q_r; K_r; V_r]`` (its heads, its groups:
  ``block_sizes`` ``(nh hd, g hd, g hd)``, each block split in ``tp`` equal parts). Query head ``i`` attends
  with key/value group ``i // (nh / g)``. This is ChatGLM2's packing exactly, and SAT's ChatGLM packing. The
  per-head packing of HF ChatGLM-6B and SAT GLM-130B (``[q_0; k_0; v_0; q_1; ...]``, ``[nh, 3, hd, H]``) converts
  as ``w.view(nh, 3, hd, H).transpose(0, 1).reshape(3 nh hd, H)`` (and back with ``view(3, nh, hd, H)
  .transpose(0, 1)``); biases the same with ``H`` dropped.
- With a GLU activation ``mlp.dense_h_to_4h`` is ``[W1; W2]`` (``2 x ffn`` rows, two blocks): rank ``r`` holds
  ``[W1_r; W2_r]``, so its halves match. ``swiglu`` is ``silu(x W1) * (x W2)`` (ChatGLM2: the first half is the
  gate), ``geglu`` is ``(x W1) * gelu(x W2)`` (GLM-130B: the second half goes through the exact GeLU) — the
  released code's conventions, so their tensors load unchanged.
- Rotary models keep ``position_ids [b, 2, s]``: ``rope`` uses row 0, ``rope_2d`` rotates the first half of each
  head with row 0 and the second half with row 1 (rotate-half, frequencies of a ``hd / 2`` rotary), as
  ChatGLM-6B. ``rotary_interleaved`` rotates pairs ``(x[2i], x[2i+1])`` (ChatGLM2; HF ChatGLM-6B and SAT use
  rotate-half). No rotary tensor is stored (HF's ``inv_freq`` buffers are derived from ``rotary_base``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError
from megatron_glm.model.builders import layer_tensors
from megatron_glm.model.tensor_spec import DTYPE_ROLES, INITS, ROLES, TensorSpec, norm_tensors

__all__ = ["DTYPE_ROLES", "INITS", "ROLES", "TensorSpec", "layer_tensors"]  # re-exported: defined next door

PIPE_KINDS = ("word_embedding", "position_embeddings", "layer", "final_norm", "head")
LAYER_PREFIX = "transformer.layers.{}."
VOCAB_TENSOR = "word_embeddings.weight"
OUTPUT_TENSOR = "output_layer.weight"
_LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.")
_PIPE_PREFIX_RE = re.compile(r"^(tied_modules\.[^.]+\.|\d+\.)")


@dataclass(frozen=True)
class PipeLayer:
    """One layer of the pipeline module: its kind, transformer layer index and the tensors its file holds."""

    index: int
    kind: str
    layer: int | None = None
    names: tuple[str, ...] = ()


def embedding_tensors(config: ModelConfig) -> list[TensorSpec]:
    """Pipe layers 0 and 1: the word embedding (vocab-parallel, tied head) and the position tables (none with
    rotary positions)."""
    h, p = config.hidden_size, config.max_sequence_length + 1
    out = [TensorSpec(VOCAB_TENSOR, (config.vocab_size, h), "embedding", 0, init="normal", pipe_layer=0)]
    if config.rotary:
        return out
    out.append(TensorSpec("transformer.position_embeddings.weight", (p, h), "embedding", init="normal", pipe_layer=1))
    if config.block_position_encoding:
        out.append(
            TensorSpec("transformer.block_position_embeddings.weight", (p, h), "embedding", init="normal", pipe_layer=1)
        )
    return out


def final_tensors(config: ModelConfig) -> list[TensorSpec]:
    """Pipe layer L+2: the final norm."""
    return norm_tensors(config, name="transformer.final_layernorm")


def head_tensors(config: ModelConfig) -> list[TensorSpec]:
    """Pipe layer L+3: the untied output layer (none when the head is tied to the word embedding)."""
    if not config.untie_embeddings_and_output_weights:
        return []
    return [TensorSpec(OUTPUT_TENSOR, (config.vocab_size, config.hidden_size), "weight", 0, init="normal")]


class ModelLayout:
    """Every tensor of a GLM model with ``config``, in state-dict order, and the pipeline layers."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        n = config.num_layers
        specs = list(embedding_tensors(config))
        for i in range(n):
            prefix = LAYER_PREFIX.format(i)
            specs += [
                dataclasses.replace(s, name=prefix + s.name, layer=i, pipe_layer=i + 2)
                for s in layer_tensors(config, i)
            ]
        specs += [dataclasses.replace(s, pipe_layer=n + 2) for s in final_tensors(config)]
        specs += [dataclasses.replace(s, pipe_layer=n + 3) for s in head_tensors(config)]
        self.tensors: dict[str, TensorSpec] = {s.name: s for s in specs}
        first, positions, layer, final, head = PIPE_KINDS
        kinds = [first, positions, *[layer] * n, final, head]
        self.pipe_layers = [
            PipeLayer(
                index=k,
                kind=kind,
                layer=k - 2 if kind == "layer" else None,
                names=tuple(s.name for s in specs if s.pipe_layer == k),
            )
            for k, kind in enumerate(kinds)
        ]

    def names(self) -> list[str]:
        """Every tensor name, in the model's state-dict order."""
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def parameter_count(self) -> int:
        """Every parameter of the model (the tied head counted once)."""
        return sum(math.prod(s.shape) for s in self)

    def __getitem__(self, name: str) -> TensorSpec:
        spec = self.tensors.get(name)
        if spec is None:
            raise CheckpointError(f"{name}: not a tensor of this GLM model ({self.config.num_layers} layers)")
        return spec

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.tensors.values())

    @property
    def tied_head(self) -> bool:
        """Whether the head is the word embedding's weight (no ``output_layer.weight``)."""
        return not self.config.untie_embeddings_and_output_weights

    @property
    def saved_pipe_layers(self) -> list[PipeLayer]:
        """The pipeline layers with a file of their own: every one but the tied head (a rotary model's position
        layer has an empty file, as DeepSpeed writes one for every module of the pipeline)."""
        return [p for p in self.pipe_layers if p.names or p.kind == "position_embeddings"]

    def block_init_stds(self, name: str) -> tuple[float, ...]:
        """The standard deviation of each packed block (along the split dimension) of a normally initialised
        tensor; one entry for a plain tensor."""
        spec = self[name]
        sizes = spec.sizes_along_split()
        scale = spec.init_scale or (1.0,) * len(sizes)
        if spec.init == "scaled_normal":
            base = [self.config.init_std / (2.0 * self.config.num_layers) ** 0.5] * len(sizes)
        elif spec.init == "normal":
            base = [self.config.init_std] * len(sizes)
        elif spec.init == "xavier":  # fan_out of a packed block is its own rows (the separate projections)
            rows_split = spec.split_dim == 0
            base = [(2.0 / (spec.shape[1] + (n if rows_split else spec.shape[0]))) ** 0.5 for n in sizes]
        else:
            raise ValueError(f"{name} is initialised to {spec.init}, not from a normal distribution")
        return tuple(b * c for b, c in zip(base, scale, strict=True))

    def init_std(self, name: str) -> float:
        """The standard deviation of a normally initialised tensor (one for the whole tensor)."""
        stds = set(self.block_init_stds(name))
        if len(stds) != 1:
            raise ValueError(f"{name} has a different init std per packed block: use block_init_stds")
        return stds.pop()

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
