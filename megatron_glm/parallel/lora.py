"""LoRA adapters on the tensor-parallel linears (Hu et al. 2021): ``y = x W^T + (alpha / r) dropout(x) A^T B^T``.

An adapter is the ``lora`` submodule of a :class:`ColumnParallelLinear` or :class:`RowParallelLinear`
(parameters ``<linear>.lora.A [r, in]`` and ``<linear>.lora.B [out, r]``; ``None`` when the linear has none),
split so that every rank computes its part of the full adapter's output:

- column-parallel (``W`` split by rows): ``A`` replicated, ``B`` split by rows like ``W``, with its packed
  blocks (``[Q; K; V]``, GLU ``[W1; W2]``), so rank ``r``'s rows of ``B`` are the rows of ``W_r``. ``A`` enters
  through ``copy_to_tensor_parallel_region``: each rank's gradient of ``A`` is partial (its output rows), summed
  over the group in backward.
- row-parallel (``W`` split by columns): ``A`` split by columns like ``W``, ``B`` replicated. The partial
  ``x_r A_r^T`` (``[..., r]``, small) is all-reduced (reduce-scattered under sequence parallelism, where ``B``'s
  gradient is then summed over the group) before ``B``, so ``B``'s gradient is whole on every rank.

Dropout on the adapter input draws its mask over the *full* input from the default (replicated) RNG stream and
keeps this rank's slice, so masks (and results) are the same for every tensor-parallel size; activation
checkpointing replays it (the default stream is restored on recompute). ``A`` is drawn for the full tensor from
a generator seeded by (seed, name) (peft's ``kaiming_uniform(a=sqrt(5))``: U(-1/sqrt(in), 1/sqrt(in))), ``B``
starts at zero, so the adapted model starts equal to the base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.parallel.layers import _sharded_parameter
from megatron_glm.parallel.mappings import copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region
from megatron_glm.parallel.random import InitMethod, stable_seed
from megatron_glm.parallel.sequence_parallel import reduce_scatter_to_sequence_parallel_region
from megatron_glm.parallel.sharding import Stride
from megatron_glm.parallel.state import ParallelState

LORA_MODULE = "lora"
LORA_TENSORS = ("A", "B")


def uniform_init(bound: float, seed: int) -> InitMethod:
    """Fill a tensor from U(-bound, bound) with a private generator seeded with ``seed`` (drawn in fp32)."""

    def init(t: torch.Tensor) -> None:
        if t.is_meta:
            return
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            t.copy_(torch.empty(t.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))

    return init


def replicated_dropout(x: torch.Tensor, p: float, training: bool, full_last: int, rank: int) -> torch.Tensor:
    """Dropout of ``x``, the ``rank``-th of the equal slices of a ``[..., full_last]`` input along its last
    dimension: the mask is drawn for the full input from the default stream and this slice kept."""
    if not training or p == 0.0:
        return x
    mask = torch.empty((*x.shape[:-1], full_last), device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    width = x.shape[-1]
    return x * mask[..., rank * width : (rank + 1) * width] / (1.0 - p)


class LoRAAdapter(nn.Module):
    """The low-rank update of one tensor-parallel linear; ``forward`` returns this rank's part of
    ``(alpha / r) dropout(x) A^T B^T`` (see the module doc for the split of ``A`` and ``B``).

    ``row_parallel``: the linear is row-parallel (``x`` is this rank's slice of the input features).
    ``stride``: the packed blocks of a column-parallel weight (``B`` is split the same way).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        row_parallel: bool,
        stride: Stride,
        seed: int,
        parallel_state: ParallelState,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.ps = parallel_state
        self.rank, self.alpha, self.dropout, self.row_parallel = rank, alpha, dropout, row_parallel
        self.in_features, self.out_features = in_features, out_features
        self.scaling = alpha / rank
        a_init = uniform_init(in_features**-0.5, seed)
        tp1 = ParallelState()
        if row_parallel:
            self.A = _sharded_parameter((rank, in_features), 1, 1, a_init, parallel_state, dtype, device)
            self.B = _sharded_parameter((out_features, rank), 0, 1, None, tp1, dtype, device)
            self.A.lora_partition, self.B.lora_partition = (1, 1), None
        else:
            self.A = _sharded_parameter((rank, in_features), 0, 1, a_init, tp1, dtype, device)
            self.B = _sharded_parameter((out_features, rank), 0, stride, None, parallel_state, dtype, device)
            self.A.lora_partition = None
            self.B.lora_partition = (0, stride if isinstance(stride, int) else tuple(stride))

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """``x``: the linear's input as its weight sees it (column: the whole input, after the copy/gather;
        row: this rank's feature slice). Returns what to add to the linear's output on this rank."""
        ps = self.ps
        full_in = self.in_features
        x = replicated_dropout(x, self.dropout, self.training, full_in, ps.tp_rank if self.row_parallel else 0)
        if not self.row_parallel:
            a = copy_to_tensor_parallel_region(self.A, ps.tp_group)
            return F.linear(F.linear(x, a), self.B) * self.scaling
        h = F.linear(x, self.A)
        if sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h, ps.tp_group)
            b = copy_to_tensor_parallel_region(self.B, ps.tp_group)
        else:
            h = reduce_from_tensor_parallel_region(h, ps.tp_group)
            b = self.B
        return F.linear(h, b) * self.scaling

    def extra_repr(self) -> str:
        kind = "row" if self.row_parallel else "column"
        return f"{kind}, r={self.rank}, alpha={self.alpha}, dropout={self.dropout}, tp={self.ps.tp_size}"


def is_lora_name(name: str) -> bool:
    """Whether state-dict / parameter ``name`` is an adapter tensor (``....lora.A`` or ``....lora.B``)."""
    head, _, last = name.rpartition(".")
    return last in LORA_TENSORS and head.rpartition(".")[2] == LORA_MODULE


def lora_partitions(model: nn.Module) -> dict[str, tuple[int, Stride] | None]:
    """``{name: (dim, stride) or None}`` of every adapter parameter of ``model`` (its tensor-parallel split)."""
    return {n: p.lora_partition for n, p in model.named_parameters() if hasattr(p, "lora_partition")}


def seed_for(seed: int, linear_name: str) -> int:
    """The seed of the ``A`` of the adapter on linear ``linear_name`` (its original GLM name)."""
    return stable_seed(seed, linear_name, "lora.A")
