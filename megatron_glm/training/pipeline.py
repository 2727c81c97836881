"""GLM on DeepSpeed's pipeline engine: the model's pipe layers as ``LayerSpec`` / ``TiedLayerSpec``, the batch
as the engine wants it, and the loss function that keeps per-objective sums.

The pipe order and what each layer holds come from the model's layout
(:attr:`megatron_glm.model.ModelLayout.pipe_layers`); each layer is a :class:`megatron_glm.model.GLMPart`,
so its state-dict keys (and DeepSpeed's ``layer_XX`` files) carry the original GLM names and its weights
are those of the whole model. Activations between layers are tuples of tensors: ``(ids, position_ids, sep)``
into the first layer, then ``(hidden, sep)`` (rotary models: ``(hidden, position_ids, sep)``), logits out of the
head; with document isolation a ``[b, 1, s, s]`` boolean mask travels in place of ``sep``. DeepSpeed keeps
the tied word embedding identical on the first and last stage (broadcast at start,
gradients all-reduced); an untied head (``output_layer``) is a plain layer of the last stage. Activation checkpointing
runs inside each transformer layer (``model.checkpoint_activations``), restoring the tensor-parallel dropout
stream on recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from megatron_glm.batch import Batch
from megatron_glm.config import ModelConfig
from megatron_glm.model import (
    GLMPart,
    ModelLayout,
    PipeLayer,
    add_group_sums,
    batch_attention_mask,
    glm_loss,
    new_rng_tracker,
)
from megatron_glm.model.glm import check_config
from megatron_glm.parallel import ParallelState, RNGStatesTracker

TIED_KEY = "word_embeddings"
TIED_WEIGHT = "word_embeddings.weight"


class PipeStage(GLMPart):
    """A :class:`GLMPart` with the engine's tuple activations."""

    def __init__(
        self,
        pipe: PipeLayer,
        config: ModelConfig,
        parallel_state: ParallelState,
        seed: int,
        tracker: RNGStatesTracker,
        dtype: torch.dtype,
        device: Any,
    ) -> None:
        super().__init__(pipe, config, parallel_state, seed=seed, tracker=tracker, params_dtype=dtype, device=device)

    def forward(self, inputs: Any) -> Any:
        kind = self.pipe.kind
        if kind == "word_embedding":
            ids, position_ids, sep = inputs
            return self.embed_tokens(ids), position_ids, sep
        if kind == "position_embeddings":
            word, position_ids, sep = inputs
            h = self.embed_positions(word, position_ids)
            return (h, position_ids, sep) if self.layout.config.rotary else (h, sep)
        if kind == "layer":
            if self.layout.config.rotary:  # rotary layers need the positions: (hidden, position_ids, sep)
                h, position_ids, sep = inputs
                return self.run_layers(h, sep, position_ids), position_ids, sep
            h, sep = inputs
            return self.run_layers(h, sep), sep
        if kind == "final_norm":
            return self.final_norm(inputs[0])
        if kind == "head" and not self.layout.tied_head:
            return self.logits(inputs)
        raise RuntimeError("the tied head runs through head_forward")


class GLMLayerPipe(PipeStage):
    """A transformer layer (the class name DeepSpeed partitions and checkpoints by)."""


def head_forward(stage: PipeStage, h: torch.Tensor) -> torch.Tensor:
    """The tied head on the last stage: logits for this rank's vocabulary slice."""
    return stage.logits(h)


class StageLoss(Protocol):
    """What the pipeline engine's ``loss_fn`` must be for the trainer: the loss of the last stage's logits,
    keeping per-objective ``[loss sum, tokens]`` that :meth:`pop` hands over (and resets)."""

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor: ...

    def pop(self) -> dict[int, list[float]]: ...


class PipelineLoss:
    """``loss_fn`` of the pipeline: the GLM loss, keeping per-objective sums for logging."""

    def __init__(self, parallel_state: ParallelState) -> None:
        self.ps = parallel_state
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


@dataclass
class TrainingModel:
    """What training builds on one rank: the module (a ``GLMModel``, or this rank's pipeline stage, a
    ``deepspeed.pipe.PipelineModule``), its tensor-parallel dropout stream, and the pipeline's loss
    function (``None`` without pipelining: the trainer computes the loss itself)."""

    module: Any
    rng_tracker: RNGStatesTracker
    loss: PipelineLoss | None = None


def build_pipeline_model(
    config: ModelConfig,
    parallel_state: ParallelState,
    *,
    seed: int = 1234,
    partition_method: str = "uniform",
    params_dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> TrainingModel:
    """This rank's pipeline stage of the model, one ``LayerSpec`` per pipe layer of the layout.

    ``partition_method``: ``uniform`` balances transformer layers, ``parameters`` balances parameter counts.
    Must be called after ``torch.distributed`` is initialised, on every rank (Megatron rank order).
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ps = parallel_state

    check_config(config, ps)  # once for the model, not per part
    tracker = new_rng_tracker(seed, ps, device)
    common = (config, ps, seed, tracker, params_dtype, device)
    specs: list[Any] = []
    layout = ModelLayout(config)
    for pipe in layout.pipe_layers:
        if pipe.kind == "word_embedding":
            specs.append(TiedLayerSpec(TIED_KEY, PipeStage, pipe, *common, tied_weight_attr=TIED_WEIGHT))
        elif pipe.kind == "head" and layout.tied_head:
            specs.append(
                TiedLayerSpec(TIED_KEY, PipeStage, pipe, *common, forward_fn=head_forward, tied_weight_attr=TIED_WEIGHT)
            )
        else:
            specs.append(LayerSpec(GLMLayerPipe if pipe.kind == "layer" else PipeStage, pipe, *common))
    topology = PipeModelDataParallelTopology(num_pp=ps.pp_size, num_mp=ps.tp_size, num_dp=ps.dp_size)
    loss = PipelineLoss(ps)
    method = f"type:{GLMLayerPipe.__name__}" if partition_method == "uniform" else partition_method
    module = PipelineModule(
        specs, topology=topology, loss_fn=loss, partition_method=method, checkpointable_layers=[GLMLayerPipe.__name__]
    )
    return TrainingModel(module=module, rng_tracker=tracker, loss=loss)


def pipeline_batch(batch: Batch) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """A micro-batch as the pipeline engine wants it: ``(inputs, labels)``."""
    return (
        (batch["input_ids"], batch["position_ids"], batch_attention_mask(batch)),
        (batch["labels"], batch["loss_mask"], batch["objective"]),
    )
