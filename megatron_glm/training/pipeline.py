"""GLM on DeepSpeed's pipeline engine: the model's pipe layers as ``LayerSpec`` / ``TiedLayerSpec``, the batch
as the engine wants it, and the loss function that keeps per-objective sums.

The pipe order and what each layer holds come from the model's layout
(:attr:`megatron_glm.model.ModelLayout.pipe_layers`); each layer is a :class:`megatron_glm.model.GLMPart`,
so its state-dict keys (and DeepSpeed's ``layer_XX`` files) carry the original GLM names and its weights
are those of the whole model, and it runs the whole model's forward steps. Activations between layers are tuples
of tensors, the same for every architecture (:mod:`megatron_glm.model.part`): ``(ids, position_ids, sep, rows)``
into the first layer, then ``(hidden, aux, position_ids, sep, rows)`` (``hidden``: sequence shards under sequence
parallelism; ``aux``: the auxiliary-loss accumulator; ``rows``: the boolean loss rows, on which the last layer runs
when it shares the last stage with the head), the head's ``ModelOutput`` into the loss function (the
model's one loss protocol, fused head and loss rows included); with document isolation a ``[b, 1, s, s]`` boolean
mask travels in place of ``sep``. DeepSpeed's activation partitioning over tensor-parallel ranks is off (the
accumulator carries a gradient; sequence shards differ by rank). DeepSpeed keeps
the tied word embedding identical on the first and last stage (broadcast at start,
gradients all-reduced); an untied head (``output_layer``) is a plain layer of the last stage. Activation checkpointing
runs inside each transformer layer (``model.checkpoint_activations``), restoring the tensor-parallel dropout
stream on recompute. Under context parallelism each micro-batch holds this rank's positions (:func:`pipeline_batch`),
the last stage's loss is reduced over the context-parallel group (:class:`PipelineLoss`) and the topology's
data-parallel axis is ``dp x cp`` (``ParallelState.grad_dp_size``: DeepSpeed averages gradients over it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from megatron_glm.batch import Batch
from megatron_glm.config import ModelConfig
from megatron_glm.model import (
    GLMPart,
    LanguageModelLoss,
    LossBatch,
    LossFunction,
    ModelLayout,
    ModelOutput,
    PipeLayer,
    add_group_sums,
    batch_attention_mask,
    new_rng_tracker,
)
from megatron_glm.model.context import aux_loss_names
from megatron_glm.model.glm import check_config
from megatron_glm.model.meta_device import materialize
from megatron_glm.parallel import ParallelState, RNGStatesTracker
from megatron_glm.parallel.context_parallel import ContextParallel, reduce_loss, split_batch
from megatron_glm.training.step_stats import PartSums

TIED_KEY = "word_embeddings"
TIED_WEIGHT = "word_embeddings.weight"


class PipeStage(GLMPart):
    """A :class:`GLMPart` as DeepSpeed's ``LayerSpec`` builds it (positional arguments)."""

    def __init__(
        self,
        pipe: PipeLayer,
        config: ModelConfig,
        parallel_state: ParallelState,
        seed: int,
        tracker: RNGStatesTracker,
        dtype: torch.dtype,
        device: Any,
        aux_names: tuple[str, ...] = (),
        for_loading: bool = False,
    ) -> None:
        """``for_loading``: built on the meta device, then given uninitialised storage on ``device`` (its weights
        are about to be loaded: no random init drawn)."""
        super().__init__(
            pipe,
            config,
            parallel_state,
            seed=seed,
            tracker=tracker,
            params_dtype=dtype,
            device="meta" if for_loading else device,
            aux_names=aux_names,
        )
        if for_loading:
            materialize(self, device)


class GLMLayerPipe(PipeStage):
    """A transformer layer (the class name DeepSpeed partitions and checkpoints by)."""


def head_forward(stage: PipeStage, inputs: tuple[torch.Tensor, ...]) -> ModelOutput:
    """The tied head on the last stage (whichever pipe layer built the shared module): its output for the loss."""
    return stage.head_output(inputs)


class StageLoss(Protocol):
    """What the pipeline engine's ``loss_fn`` must be for the trainer: the loss of the last stage's output,
    keeping per-objective ``[loss sum, tokens]`` that :meth:`pop` hands over (and resets), and the loss's parts
    (:meth:`pop_parts`)."""

    def __call__(self, output: ModelOutput, labels: tuple[torch.Tensor, ...]) -> torch.Tensor: ...

    def pop(self) -> dict[int, list[float]]: ...

    def pop_parts(self) -> PartSums: ...


class PipelineLoss:
    """``loss_fn`` of the pipeline: the model's :class:`~megatron_glm.model.objective.LossFunction` on the engine's
    ``(output, labels)``, keeping per-objective sums for logging. ``cp``: under context parallelism the loss is
    reduced over the context-parallel group as without pipelining (:func:`~megatron_glm.parallel.context_parallel.\
reduce_loss`: the whole sequence's masked mean; the per-objective sums stay this rank's, summed over ranks when
    logged)."""

    def __init__(self, loss: LossFunction | None = None, cp: ContextParallel | None = None) -> None:
        self.loss = loss or LanguageModelLoss()
        self.cp = cp
        self.objectives: dict[int, list[float]] = {}
        self.parts = PartSums()

    def __call__(self, output: ModelOutput, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        target, loss_mask, objective = labels
        out = self.loss(output, LossBatch(target, loss_mask, objective))
        add_group_sums(self.objectives, out.by_group(objective))
        self.parts.add(out.parts)
        return out.loss if self.cp is None else reduce_loss(out, self.cp).loss

    def pop(self) -> dict[int, list[float]]:
        """Per-objective ``[loss sum, tokens]`` since the last call (the loss's parts are reset too)."""
        out, self.objectives, self.parts = self.objectives, {}, PartSums()
        return out

    def pop_parts(self) -> PartSums:
        """The loss's parts since the last call (:mod:`~megatron_glm.training.step_stats`)."""
        out, self.parts = self.parts, PartSums()
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
    loss: LossFunction | None = None,
    aux_names: tuple[str, ...] | None = None,
    for_loading: bool = False,
) -> TrainingModel:
    """This rank's pipeline stage of the model, one ``LayerSpec`` per pipe layer of the layout.

    ``partition_method``: ``uniform`` balances transformer layers, ``parameters`` balances parameter counts.
    ``loss``: the loss of the last stage's output (default: the pretraining loss). ``aux_names``: the auxiliary
    loss terms the layers may add (default: the architecture's, :func:`~megatron_glm.model.context.aux_loss_names`).
    ``for_loading``: every weight is about to be loaded (a weights-only start, a resume): no random init is drawn.
    Must be called after ``torch.distributed`` is initialised, on every rank (Megatron rank order).
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ps = parallel_state

    check_config(config, ps)  # once for the model, not per part
    tracker = new_rng_tracker(seed, ps, device)
    names = aux_loss_names(config) if aux_names is None else tuple(aux_names)
    common = (config, ps, seed, tracker, params_dtype, device, names, for_loading)
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
    topology = PipeModelDataParallelTopology(num_pp=ps.pp_size, num_mp=ps.tp_size, num_dp=ps.grad_dp_size)
    stage_loss = PipelineLoss(loss, ContextParallel.of(ps))
    method = f"type:{GLMLayerPipe.__name__}" if partition_method == "uniform" else partition_method
    module = PipelineModule(
        specs,
        topology=topology,
        loss_fn=stage_loss,
        partition_method=method,
        checkpointable_layers=[GLMLayerPipe.__name__],
    )
    _last_layer_on_loss_rows(module, config, ps)
    return TrainingModel(module=module, rng_tracker=tracker, loss=stage_loss)


def _last_layer_on_loss_rows(module: Any, config: ModelConfig, parallel_state: ParallelState) -> None:
    """``last_layer_loss_rows``: the model's last layer computes the loss rows only when it is on the last stage
    (with the final norm and the head, so its ``[n, H]`` output never crosses stages), without sequence
    parallelism, MTP layers or experts; the rows reach it in the activations (:func:`pipeline_batch`)."""
    if not (config.last_layer_loss_rows and parallel_state.is_last_stage):
        return
    if config.num_nextn_predict_layers or config.num_experts:  # MTP layers and routers read every row
        return
    for part in module.modules():
        if isinstance(part, GLMPart) and part.pipe.kind == "layer" and part.pipe.layer == config.num_layers - 1:
            part.last_layer_rows = not part.sequence_parallel


def pipeline_batch(
    batch: Batch, cp: ContextParallel | None = None
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """A micro-batch as the pipeline engine wants it: ``(inputs, labels)``; the inputs carry the ``[b, s]`` boolean
    loss rows to the last layer (``last_layer_loss_rows``). ``cp``: this rank's positions of the token ids, position
    ids, labels and loss mask, as the trainer splits them without pipelining (``split_batch``: the mask stays
    global)."""
    if cp is not None:
        batch = split_batch(batch, cp.size, cp.rank)
    return (
        (batch["input_ids"], batch["position_ids"], batch_attention_mask(batch, dense=True), batch["loss_mask"] != 0),
        (batch["labels"], batch["loss_mask"], batch["objective"]),
    )
