"""The tensor-parallel linears of a layer part, built from the part's declared tensors (shapes, bias, packing)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from megatron_glm.model.tensor_spec import TensorSpec
from megatron_glm.parallel import ColumnParallelLinear, RowParallelLinear

if TYPE_CHECKING:
    from megatron_glm.model.builders import BuildContext


def by_name(specs: Iterable[TensorSpec]) -> dict[str, TensorSpec]:
    return {s.name: s for s in specs}


def _weight(tensors: Mapping[str, TensorSpec], name: str, split_dim: int) -> TensorSpec:
    w = tensors[f"{name}.weight"]
    if w.split_dim != split_dim:
        raise ValueError(f"{w.name}: declared split along {w.split_dim}, built split along {split_dim}")
    return w


def column_parallel(ctx: BuildContext, tensors: Mapping[str, TensorSpec], name: str) -> ColumnParallelLinear:
    """``name.weight [out, in]`` split along its rows with the declared packing (``[Q_r; K_r; V_r]``, GLU halves),
    a bias when ``name.bias`` is declared."""
    w = _weight(tensors, name, 0)
    return ColumnParallelLinear(
        w.shape[1],
        w.shape[0],
        bias=f"{name}.bias" in tensors,
        stride=w.partition[1],
        init_method=ctx.init(w.name),
        parallel_state=ctx.parallel_state,
        params_dtype=ctx.params_dtype,
        device=ctx.device,
    )


def row_parallel(ctx: BuildContext, tensors: Mapping[str, TensorSpec], name: str) -> RowParallelLinear:
    """``name.weight [out, in]`` split along its columns (its input is the column-parallel output), a replicated
    bias when ``name.bias`` is declared."""
    w = _weight(tensors, name, 1)
    return RowParallelLinear(
        w.shape[1],
        w.shape[0],
        bias=f"{name}.bias" in tensors,
        input_is_parallel=True,
        init_method=ctx.init(w.name),
        parallel_state=ctx.parallel_state,
        params_dtype=ctx.params_dtype,
        device=ctx.device,
    )
