"""Tensor-parallel layers: column/row-parallel linear and vocab-parallel embedding.

Each layer initialises the *full* weight with ``init_method`` and keeps its shard, so the same seed gives
the same full model for any tensor-parallel size. Sharded parameters carry ``tensor_model_parallel``,
``partition_dim`` and ``partition_stride`` attributes (used by checkpoint resharding and grad-norm code).
The linears take an optional LoRA adapter, their ``lora`` submodule (``megatron_glm.parallel.lora``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron_glm.parallel.random import InitMethod
from megatron_glm.parallel.sequence_parallel import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_glm.parallel.sharding import Stride, shard
from megatron_glm.parallel.state import ParallelState


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


def _sharded_parameter(
    shape: tuple[int, int],
    dim: int,
    stride: Stride,
    init_method: InitMethod | None,
    parallel_state: ParallelState,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> nn.Parameter:
    ps = parallel_state
    if device is not None and torch.device(device).type == "meta":  # shapes only (parameter counts, planning)
        local_shape = list(shape)
        local_shape[dim] //= ps.tp_size
        param = nn.Parameter(torch.empty(local_shape, dtype=dtype, device="meta"))
        param.tensor_model_parallel = ps.tp_size > 1
        param.partition_dim = dim
        param.partition_stride = stride if isinstance(stride, int) else tuple(stride)
        return param
    full = torch.empty(shape, dtype=torch.float32)
    if init_method is not None:
        init_method(full)
    else:
        nn.init.zeros_(full)
    local = shard(full, dim, ps.tp_rank, ps.tp_size, stride)
    param = nn.Parameter(local.to(device=device, dtype=dtype))
    param.tensor_model_parallel = ps.tp_size > 1
    param.partition_dim = dim
    param.partition_stride = stride if isinstance(stride, int) else tuple(stride)
    return param


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its output dimension; rank r computes ``Y_r``.

    ``stride`` > 1 shards a fused weight made of ``stride`` blocks per rank (``[q_r; k_r; v_r]``); a tuple gives
    unequal blocks by their full sizes (grouped-query ``[Q; K; V]``).
    With ``gather_output`` the full ``Y`` is returned on every rank.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod | None = None,
        stride: Stride = 1,
        parallel_state: ParallelState | None = None,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.ps = parallel_state or ParallelState()
        self.input_size, self.output_size = input_size, output_size
        self.gather_output = gather_output
        self.output_size_per_partition = _divide(output_size, self.ps.tp_size, "output size")
        self.weight = _sharded_parameter(
            (output_size, input_size), 0, stride, init_method, self.ps, params_dtype, device
        )
        if bias:
            self.bias = _sharded_parameter((output_size,), 0, stride, None, self.ps, params_dtype, device)
        else:
            self.register_parameter("bias", None)
        self.register_module("lora", None)

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """``sequence_parallel``: ``x [b, s/tp, in]`` is this rank's sequence shard; it is all-gathered
        (gradient reduce-scattered) instead of copied (gradient all-reduced)."""
        if sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.ps.tp_group)
        else:
            x = copy_to_tensor_parallel_region(x, self.ps.tp_group)
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            y = y + self.lora(x)
        return gather_from_tensor_parallel_region(y, self.ps.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.ps.tp_size}, bias={self.bias is not None}"


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its input dimension; partial results are all-reduced,
    then the (replicated) bias is added once."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = True,
        input_is_parallel: bool = False,
        init_method: InitMethod | None = None,
        parallel_state: ParallelState | None = None,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.ps = parallel_state or ParallelState()
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel = input_is_parallel
        self.input_size_per_partition = _divide(input_size, self.ps.tp_size, "input size")
        self.weight = _sharded_parameter((output_size, input_size), 1, 1, init_method, self.ps, params_dtype, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.register_module("lora", None)

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """``sequence_parallel``: the partial results are reduce-scattered along the sequence (dim 1) instead
        of all-reduced, and the bias is added to this rank's shard (its gradient all-reduced)."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.ps.tp_group)
        if sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(F.linear(x, self.weight), self.ps.tp_group)
            bias = None if self.bias is None else copy_to_tensor_parallel_region(self.bias, self.ps.tp_group)
        else:
            y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.ps.tp_group)
            bias = self.bias
        if self.lora is not None:
            y = y + self.lora(x, sequence_parallel)
        return y + bias if bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.ps.tp_size}, bias={self.bias is not None}"


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over tensor-parallel ranks."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: InitMethod | None = None,
        parallel_state: ParallelState | None = None,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.ps = parallel_state or ParallelState()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = _divide(num_embeddings, self.ps.tp_size, "vocab size")
        self.vocab_start = self.ps.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = _sharded_parameter(
            (num_embeddings, embedding_dim), 0, 1, init_method, self.ps, params_dtype, device
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.ps.tp_group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.ps.tp_size}"
