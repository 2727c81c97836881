"""Parallel core: explicit parallel state, tensor-parallel mappings and layers, cross entropy, RNG.

Knows nothing about GLM.
"""

from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_glm.parallel.fused_head_loss import fused_head_cross_entropy
from megatron_glm.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_glm.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron_glm.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    model_parallel_seed,
    normal_init,
    stable_seed,
)
from megatron_glm.parallel.sequence_parallel import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron_glm.parallel.sharding import shard, unshard
from megatron_glm.parallel.state import ParallelState, initialize_parallel_state, rank_grid

__all__ = [
    "MODEL_PARALLEL_RNG",
    "ColumnParallelLinear",
    "ParallelState",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tensor_parallel_region",
    "fused_head_cross_entropy",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "initialize_parallel_state",
    "model_parallel_seed",
    "normal_init",
    "rank_grid",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "shard",
    "stable_seed",
    "unshard",
    "vocab_parallel_cross_entropy",
]
