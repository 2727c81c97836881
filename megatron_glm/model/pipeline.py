"""GLM as a DeepSpeed ``PipelineModule``: embedding stage, transformer layers, final norm and tied head.

Pipe layers (index: what it holds, its state-dict keys = the original GLM names)::

    0        word embedding (tied)     word_embeddings.weight
    1        position embeddings       transformer.{position,block_position}_embeddings.weight
    2+i      transformer layer i       transformer.layers.{i}.*
    L+2      final LayerNorm           transformer.final_layernorm.*
    L+3      head (tied to layer 0)    word_embeddings.weight

Activations between stages are tuples of tensors: ``(ids, position_ids, sep)`` into the first layer, then
``(hidden, sep)`` between layers, logits out of the head. DeepSpeed keeps the tied word embedding identical
on the first and last stage (broadcast at start, gradients all-reduced). Initialisation is by parameter
name (as in :class:`GLMModel`), so a pipeline model starts from exactly the weights of the whole model.
Activation checkpointing runs inside each layer (``model.checkpoint_activations``), restoring the
tensor-parallel dropout stream on recompute.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.glm import init_method_for
from megatron_glm.model.layout import ModelLayout
from megatron_glm.model.loss import add_group_sums, glm_loss
from megatron_glm.model.masks import prepare_attention_mask
from megatron_glm.model.transformer import GLMTransformer
from megatron_glm.parallel import (
    MODEL_PARALLEL_RNG,
    ParallelState,
    RNGStatesTracker,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    model_parallel_seed,
)

TIED_KEY = "word_embeddings"
LAYER_CLASS = "GLMLayerPipe"


def pipe_layer_prefixes(num_layers: int) -> list[str]:
    """What each pipe layer index holds, as the original-name prefix of its keys (for conversion)."""
    return (["word_embeddings.", "transformer."] + [f"transformer.layers.{i}." for i in range(num_layers)]
            + ["transformer.final_layernorm.", "word_embeddings."])


def _transformer(config: ModelConfig, ps: ParallelState, seed: int, dtype: torch.dtype, device: Any, *,
                 start: int, end: int, pre: bool, post: bool) -> GLMTransformer:
    return GLMTransformer(
        num_layers=config.num_layers, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        max_sequence_length=config.max_sequence_length, layernorm_epsilon=config.layernorm_epsilon,
        attention_dropout=config.attention_dropout, hidden_dropout=config.hidden_dropout,
        attention_impl=config.attention_impl, block_position_encoding=config.block_position_encoding,
        checkpoint_activations=config.checkpoint_activations, checkpoint_num_layers=1,
        recompute_granularity=config.recompute_granularity, layer_start=start,
        layer_end=end, pre_process=pre, post_process=post,
        init_for=lambda n: init_method_for(n, ModelLayout(config), seed),
        parallel_state=ps, params_dtype=dtype, device=device)


class WordEmbeddingPipe(nn.Module):
    """The vocab-parallel word embedding; on the last stage its tied copy computes the logits."""

    def __init__(self, config: ModelConfig, ps: ParallelState, seed: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.ps = ps
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size,
            init_method=init_method_for("word_embeddings.weight", ModelLayout(config), seed),
            parallel_state=ps, params_dtype=dtype, device=device)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        ids, position_ids, sep = inputs
        return self.word_embeddings(ids), position_ids, sep


def head_forward(module: WordEmbeddingPipe, h: torch.Tensor) -> torch.Tensor:
    """Tied head: logits for this rank's vocabulary slice."""
    h = copy_to_tensor_parallel_region(h, module.ps.tp_group)
    return F.linear(h, module.word_embeddings.weight)


class PositionEmbeddingPipe(nn.Module):
    """Adds position and block-position embeddings (then embedding dropout)."""

    def __init__(self, config: ModelConfig, ps: ParallelState, seed: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.transformer = _transformer(config, ps, seed, dtype, device, start=0, end=0, pre=True, post=False)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        word, position_ids, sep = inputs
        return self.transformer.embed(word, position_ids), sep


class GLMLayerPipe(nn.Module):
    """Transformer layer ``index`` (keys ``transformer.layers.{index}.*``)."""

    def __init__(self, config: ModelConfig, ps: ParallelState, seed: int, dtype: torch.dtype, device: Any,
                 index: int, tracker: RNGStatesTracker) -> None:
        super().__init__()
        self.transformer = _transformer(config, ps, seed, dtype, device, start=index, end=index + 1, pre=False,
                                        post=False)
        self.tracker = tracker

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, sep = inputs
        mask = prepare_attention_mask(sep, h.shape[0], h.shape[1], h.device)
        return self.transformer(h, mask, self.tracker), sep


class FinalNormPipe(nn.Module):
    """The final LayerNorm (keys ``transformer.final_layernorm.*``)."""

    def __init__(self, config: ModelConfig, ps: ParallelState, seed: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.transformer = _transformer(config, ps, seed, dtype, device, start=config.num_layers,
                                        end=config.num_layers, pre=False, post=True)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.transformer.final_layernorm(inputs[0])


class PipelineLoss:
    """``loss_fn`` of the pipeline: the GLM loss, keeping per-objective sums for logging."""

    def __init__(self, ps: ParallelState) -> None:
        self.ps = ps
        self.objectives: dict[int, list[float]] = {}

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        target, loss_mask, objective = labels
        out = glm_loss(logits, target, loss_mask, self.ps)
        add_group_sums(self.objectives, out.by_group(objective))
        return out.loss

    def pop(self) -> dict[int, list[float]]:
        """Per-objective ``[loss sum, tokens]`` since the last call."""
        out, self.objectives = self.objectives, {}
        return out


def build_pipeline_model(config: ModelConfig, ps: ParallelState, *, seed: int = 1234, partition_method: str = "uniform",
                         params_dtype: torch.dtype = torch.float32, device: Any = None) -> Any:
    """A ``deepspeed.pipe.PipelineModule`` for this rank's stage, with ``rng_tracker`` and ``loss`` attributes.

    ``partition_method``: ``uniform`` balances transformer layers, ``parameters`` balances parameter counts.
    Must be called after ``torch.distributed`` is initialised, on every rank (Megatron rank order).
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if config.vocab_size <= 0:
        raise ValueError("config.vocab_size must be resolved (> 0) before building the model")
    tracker = RNGStatesTracker(torch.device(device) if device is not None else "cpu")
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(seed, ps.tp_rank))
    common = (config, ps, seed, params_dtype, device)
    specs: list[Any] = [TiedLayerSpec(TIED_KEY, WordEmbeddingPipe, *common, tied_weight_attr="word_embeddings.weight"),
                        LayerSpec(PositionEmbeddingPipe, *common)]
    specs += [LayerSpec(GLMLayerPipe, *common, i, tracker) for i in range(config.num_layers)]
    specs += [LayerSpec(FinalNormPipe, *common),
              TiedLayerSpec(TIED_KEY, WordEmbeddingPipe, *common, forward_fn=head_forward,
                            tied_weight_attr="word_embeddings.weight")]
    topology = PipeModelDataParallelTopology(num_pp=ps.pp_size, num_mp=ps.tp_size, num_dp=ps.dp_size)
    loss = PipelineLoss(ps)
    method = f"type:{LAYER_CLASS}" if partition_method == "uniform" else partition_method
    module = PipelineModule(specs, topology=topology, loss_fn=loss, partition_method=method,
                            checkpointable_layers=[LAYER_CLASS])
    module.rng_tracker = tracker
    module.glm_loss = loss
    return module


def pipeline_batch(batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """A micro-batch dict as the pipeline engine wants it: ``(inputs, labels)``."""
    return ((batch["input_ids"], batch["position_ids"], batch["sep"]),
            (batch["labels"], batch["loss_mask"], batch["objective"]))

