"""What a model tensor is (:class:`TensorSpec`) and the declarations the layer builders share.

Every builder of a layer part (``megatron_glm.model.builders``) declares its tensors as ``TensorSpec`` values named
relative to its module; :class:`~megatron_glm.model.layout.ModelLayout` collects them, and the modules are built
from the same values (packing, split, init), so nothing restates the layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_glm.config import ModelConfig

ROLES = ("embedding", "weight", "bias", "norm")
INITS = ("normal", "scaled_normal", "xavier", "ones", "zeros")
DTYPE_ROLES = ("params", "fp32")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model.

    ``role``: ``embedding`` / ``weight`` (decayed matrices), ``bias`` / ``norm`` (no weight decay).
    ``dtype``: ``params`` (the model's parameter dtype; cast on export) or ``fp32`` (always kept fp32).
    ``split_dim``: the dimension split over tensor-parallel ranks (``None``: replicated); ``blocks``: equal
    blocks packed along it, each split separately (rank ``r`` holds ``[Q_r; K_r; V_r]`` for 3);
    ``block_sizes``: unequal packed blocks instead (their full sizes along ``split_dim``, e.g. grouped-query
    ``(nh hd, g hd, g hd)``), each split separately the same way.
    ``init``: ``normal`` N(0, init_std), ``scaled_normal`` N(0, init_std / sqrt(2 L)), ``xavier`` N(0, 2 /
    (fan_in + fan_out)) per packed block (DeepNorm), ``ones``, ``zeros``; ``init_scale``: per-block factors on
    that std (DeepNorm's beta; empty: 1).
    ``layer``: the transformer layer (``None`` for embeddings and the final norm); ``pipe_layer``: the
    pipeline layer whose file holds it.
    ``expert_dim``: the dimension indexing the ``experts`` of a Mixture-of-Experts tensor (``None``: a dense
    tensor, ``experts`` 1), split over expert-parallel ranks (rank ``e`` holds experts ``[e E/ep, (e+1) E/ep)``);
    no builder declares one yet.
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
    block_sizes: tuple[int, ...] = ()
    init_scale: tuple[float, ...] = ()
    expert_dim: int | None = None
    experts: int = 1

    def __post_init__(self) -> None:
        if self.role not in ROLES or self.init not in INITS or self.dtype not in DTYPE_ROLES:
            raise ValueError(
                f"{self.name}: role {self.role!r} / init {self.init!r} / dtype {self.dtype!r} not in "
                f"{ROLES} / {INITS} / {DTYPE_ROLES}"
            )
        if self.block_sizes and (self.split_dim is None or sum(self.block_sizes) != self.shape[self.split_dim]):
            raise ValueError(f"{self.name}: block sizes {self.block_sizes} do not add up to the split dimension")
        if self.init_scale and len(self.init_scale) != len(self.sizes_along_split()):
            raise ValueError(f"{self.name}: {len(self.init_scale)} init scales for {self.blocks} blocks")
        if self.expert_dim is None and self.experts != 1:
            raise ValueError(f"{self.name}: {self.experts} experts without an expert dimension")
        if self.expert_dim is not None and (
            self.expert_dim == self.split_dim or self.shape[self.expert_dim] != self.experts
        ):
            raise ValueError(f"{self.name}: expert dimension {self.expert_dim} must hold the {self.experts} experts")

    @property
    def partition(self) -> tuple[int, int | tuple[int, ...]] | None:
        """``(dim, blocks)`` of the tensor-parallel split (``blocks`` the number of equal packed blocks, or the
        tuple of unequal block sizes), or ``None`` when replicated."""
        if self.split_dim is None:
            return None
        return (self.split_dim, self.block_sizes or self.blocks)

    def sizes_along_split(self) -> tuple[int, ...]:
        """The full sizes of the packed blocks along the split dimension (one block for plain tensors)."""
        if self.block_sizes:
            return self.block_sizes
        if self.split_dim is None:
            return (self.shape[0],)
        return (self.shape[self.split_dim] // self.blocks,) * self.blocks

    def rank_block_sizes(self, tp_size: int) -> tuple[int, ...]:
        """The sizes of the packed blocks one of ``tp_size`` tensor-parallel ranks holds along the split dimension
        (``[Q_r; K_r; V_r]``, the GLU halves ``[W1_r; W2_r]``), in order: how its module splits that dimension."""
        return tuple(n // tp_size for n in self.sizes_along_split())

    @property
    def weight_decay(self) -> bool:
        return self.role in ("embedding", "weight")

    def shard_shape(self, tp_size: int, ep_size: int = 1) -> tuple[int, ...]:
        """The shape one of ``tp_size`` tensor-parallel (and ``ep_size`` expert-parallel) ranks holds."""
        out = list(self.shape)
        if self.split_dim is not None and tp_size > 1:
            out[self.split_dim] //= tp_size
        if self.expert_dim is not None and ep_size > 1:
            out[self.expert_dim] //= ep_size
        return tuple(out)


def norm_tensors(config: ModelConfig, size: int = 0, name: str = "") -> list[TensorSpec]:
    """A norm of kind ``config.normalization`` over ``size`` (0: the hidden size), TP-replicated: ``weight``
    (ones) and, for LayerNorm, ``bias`` (zeros), neither decayed; under ``name.`` when given."""
    h, prefix = size or config.hidden_size, f"{name}." if name else ""
    out = [TensorSpec(f"{prefix}weight", (h,), "norm", init="ones")]
    if config.normalization == "LayerNorm":
        out.append(TensorSpec(f"{prefix}bias", (h,), "bias"))
    return out


def matrix_init(config: ModelConfig, output: bool, blocks: int = 1, value_block: int | None = None) -> dict:
    """The init fields of a layer matrix (``output``: an output projection, else an input one).

    GLM: N(0, init_std) for input projections, N(0, init_std / sqrt(2 L)) for output ones. DeepNorm
    (``residual_style: deepnorm``, Wang et al. 2022, as GLM-130B): Xavier-normal per packed block, scaled by
    beta = (2 L)^-0.5 on every block of the MLP and the attention output, and on the value block
    (``value_block``) of QKV only."""
    if config.residual_style != "deepnorm":
        return {"init": "scaled_normal" if output else "normal"}
    beta = (2.0 * config.num_layers) ** -0.5
    if value_block is not None:
        return {"init": "xavier", "init_scale": tuple(beta if i == value_block else 1.0 for i in range(blocks))}
    return {"init": "xavier", "init_scale": (beta,) * blocks}


def relative(specs: list[TensorSpec], prefix: str) -> list[TensorSpec]:
    """``specs`` renamed under ``prefix`` (e.g. ``"attention."``)."""
    return [dataclasses.replace(s, name=prefix + s.name) for s in specs]
