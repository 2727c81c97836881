"""Build a training run from a config: parallel state, tokenizer, model, optimizer, DeepSpeed engine."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.checkpoint import safe_checkpoint_engine
from megatron_glm.checkpoint.lora import base_identity, lora_record
from megatron_glm.checkpoint.weights import load_model_weights
from megatron_glm.config import GLMConfig, pad_vocab_size
from megatron_glm.dtypes import DTYPES
from megatron_glm.errors import ConfigError
from megatron_glm.model import GLMModel, LossFunction, ModelLayout
from megatron_glm.model.compile import compile_layers
from megatron_glm.model.glm import new_rng_tracker
from megatron_glm.model.layout import original_name
from megatron_glm.model.lora import attach_lora, trainable_parameters
from megatron_glm.model.meta_device import materialize
from megatron_glm.model.router import keep_expert_bias_fp32
from megatron_glm.parallel import ParallelState
from megatron_glm.parallel.lora import is_lora_name
from megatron_glm.training.deepspeed_config import batch_sizes, build_deepspeed_config
from megatron_glm.training.distributed import DeepSpeedMPU
from megatron_glm.training.expert_parallel import check_zero_stage, prepare_expert_parallel
from megatron_glm.training.grad_clip import count_each_parameter_once
from megatron_glm.training.lr_schedule import LRSchedule, LRScheduler
from megatron_glm.training.pipeline import TrainingModel, build_pipeline_model


def resolve_vocab_size(cfg: GLMConfig, tokenizer_vocab: int) -> GLMConfig:
    """A copy of ``cfg`` whose ``model.vocab_size`` is set (padded) and checked against the tokenizer."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    if m.vocab_size == 0:
        size = pad_vocab_size(tokenizer_vocab, m.make_vocab_size_divisible_by, tp)
    elif m.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); set it to 0 to derive it"
        )
    else:
        size = m.vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=size))


def param_groups(model: torch.nn.Module, layout: ModelLayout, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay where the layout says so (weight matrices, embeddings), none on biases and
    norms. Parameters keep the model's order (the layout's), which checkpoint conversion relies on."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (a LoRA run's base): not in the optimizer
            continue
        decayed = is_lora_name(name) or layout[original_name(name)].weight_decay
        (decay if decayed else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_model(
    cfg: GLMConfig,
    parallel_state: ParallelState,
    device: torch.device,
    *,
    weights: str | None = None,
    resume: bool = False,
    log: Callable[[str], None] = lambda _: None,
    loss: LossFunction | None = None,
) -> TrainingModel:
    """This rank's model: a :class:`GLMModel`, or its pipeline stage (a DeepSpeed ``PipelineModule``) when
    ``pp_size > 1``. Parameters are fp32 here; DeepSpeed casts them for bf16/fp16.

    ``weights``: a checkpoint (any format and layout we read) whose model weights this rank then holds (said
    with ``log``). ``resume``: the trainer restores the model from a training checkpoint next. Either way, outside
    ZeRO-3, the model (or stage) is built on the meta device and given uninitialised storage: no random init is
    drawn (:func:`~megatron_glm.model.meta_device.materialize`). ``loss``: what the model's forward with labels
    (or the last stage) computes (default: the pretraining loss)."""
    ps = parallel_state
    built = _build(cfg, ps, device, loss, for_loading=bool(weights or resume) and not zero3(cfg, ps))
    experts = (ps.ep_size, ps.ep_rank)
    loaded = load_model_weights(built.module, weights, ps.tp_size, ps.tp_rank, experts) if weights else None
    if cfg.training.compile:
        compile_layers(built.module)
    if loaded:
        log(f"loaded model weights from {loaded}; optimizer and schedule start fresh")
    return built


def _build(
    cfg: GLMConfig, parallel_state: ParallelState, device: torch.device, loss: LossFunction | None, for_loading: bool
) -> TrainingModel:
    """The model (or pipeline stage) with LoRA attached: its random init drawn, or (``for_loading``) none drawn, on
    the meta device then given storage, for weights about to be loaded."""
    ps, seed = parallel_state, cfg.training.seed
    if ps.pp_size > 1:
        built = build_pipeline_model(
            cfg.model,
            ps,
            seed=seed,
            partition_method=cfg.parallel.pipeline_partition_method,
            device=device,
            loss=loss,
            for_loading=for_loading,
        )
    elif for_loading:
        model = materialize(GLMModel(cfg.model, ps, seed=seed, device="meta", loss=loss), device)
        model.rng_tracker = new_rng_tracker(seed, ps, device)
        built = TrainingModel(module=model, rng_tracker=model.rng_tracker)
    else:
        with partitioned_construction(cfg, ps) as params_dtype:
            model = GLMModel(cfg.model, ps, seed=seed, params_dtype=params_dtype, device=device, loss=loss)
            attach_lora(model, cfg.lora, ModelLayout(cfg.model), seed)  # LoRA: adapters, base frozen
        return TrainingModel(module=model, rng_tracker=model.rng_tracker)
    attach_lora(built.module, cfg.lora, ModelLayout(cfg.model), seed)
    return built


def zero3(cfg: GLMConfig, parallel_state: ParallelState) -> bool:
    """Whether the run partitions its parameters (ZeRO-3, offload included); stages 0 and 3 refused with EP."""
    stage = build_deepspeed_config(cfg, parallel_state.dp_size)["zero_optimization"]["stage"]
    check_zero_stage(parallel_state, stage, cfg.training.deepspeed_config or "--zero-stage")
    return stage == 3


def expert_groups(
    cfg: GLMConfig, ps: ParallelState, model: torch.nn.Module, groups: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """With expert parallelism: the layout's expert tensors marked for DeepSpeed (reduced over the
    expert-data-parallel group) and the optimizer groups split accordingly; else ``groups`` unchanged."""
    if ps.ep_size == 1:
        return groups
    layout = ModelLayout(cfg.model)

    def is_expert(name: str) -> bool:  # an expert tensor or an expert's LoRA adapter (model/expert_lora.py)
        weight = name.rpartition(".lora.")[0] + ".weight" if is_lora_name(name) else name
        return layout[original_name(weight)].expert_dim is not None

    return prepare_expert_parallel(model, groups, is_expert, ps, max(s.experts for s in layout))


def load_lora_base(
    model: torch.nn.Module, cfg: GLMConfig, ps: ParallelState, base: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """A LoRA run (``lora.rank > 0``): load the frozen base weights of ``model`` from checkpoint ``base`` (any
    layout or format) and return the run's LoRA record (its identity: :mod:`megatron_glm.checkpoint.lora`);
    ``{}`` without LoRA. Every rank calls it."""
    if cfg.lora.rank <= 0:
        return {}
    if not base:
        raise ConfigError("lora.rank > 0 needs the base checkpoint the adapters go on: pass --lora-base PATH")
    loaded = load_model_weights(model, base, ps.tp_size, ps.tp_rank, (ps.ep_size, ps.ep_rank))
    sha = [base_identity(loaded) if dist.get_rank() == 0 else None]  # the base may be large: hashed once
    dist.broadcast_object_list(sha, src=0)
    trainable, total = trainable_parameters(model)
    log(
        f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.target_names())}: base {loaded} (sha256 {sha[0][:12]}); "
        f"{trainable / 1e6:.3f} M trainable of {total / 1e6:.2f} M parameters on this rank"
    )
    return lora_record(cfg.lora, loaded, sha[0])


@contextlib.contextmanager
def partitioned_construction(cfg: GLMConfig, parallel_state: ParallelState) -> Iterator[torch.dtype]:
    """The context to build the model in, yielding its parameter dtype. Under ZeRO-3 (offload included):
    ``deepspeed.zero.Init`` over the data-parallel group, so each module's parameters are partitioned as soon
    as its constructor returns and no rank holds more than its share plus one module's full tensors. Our
    layers still draw every full tensor from its (seed, name) generator on the host before sharding, so the
    values equal the unpartitioned build's; the parameters are built in the training dtype (the engine does
    not cast a partitioned model), which is the cast it would apply. Otherwise nothing: fp32, cast later."""
    if not zero3(cfg, parallel_state):
        yield torch.float32
        return
    import deepspeed

    dtype = DTYPES[cfg.training.precision]
    with deepspeed.zero.Init(
        config_dict_or_path=build_deepspeed_config(cfg, parallel_state.dp_size, parallel_state.cp_size),
        mpu=DeepSpeedMPU(parallel_state),
        data_parallel_group=parallel_state.grad_dp_group,
        dtype=dtype,
        tensor_overrides=[],  # keep our tensors' devices and dtypes: the init draws on the host, in fp32
    ):
        yield dtype


def build_engine(cfg: GLMConfig, parallel_state: ParallelState, model: torch.nn.Module) -> tuple[Any, int, int]:
    """``(engine, accumulation_steps, global_batch_size)``: AdamW + our LR schedule inside DeepSpeed."""
    ps = parallel_state
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # keep the console to our progress lines

    o = cfg.optimizer
    fused = {"fused": True} if next(model.parameters()).device.type in ("cuda", "cpu") else {}
    zero3(cfg, ps)  # refuses ZeRO-0 and ZeRO-3 with expert parallelism
    groups = expert_groups(cfg, ps, model, param_groups(model, ModelLayout(cfg.model), o.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, **fused)
    scheduler = LRScheduler(optimizer, LRSchedule.from_config(o, cfg.training.train_iters))
    ds_config = build_deepspeed_config(cfg, ps.dp_size, ps.cp_size)
    mpu = None if ps.pp_size > 1 else DeepSpeedMPU(ps)  # a PipelineModule brings its own grid
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
    )
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    count_each_parameter_once(engine, ps)  # DeepSpeed's fp32 ZeRO-0 clipping miscounts under pipeline parallelism
    keep_expert_bias_fp32(engine.module)  # DeepSpeed cast the module to bf16/fp16; the bias is not trained
    _, accum, global_batch = batch_sizes(cfg, ps.dp_size)
    return engine, accum, global_batch
