"""The GLM model: embeddings, transformer stack, tied vocab-parallel head.

A pipeline stage is the same class with ``pre_process`` / ``post_process`` and a layer range:

- ``pre_process=True`` (first stage): holds ``word_embeddings`` and the position tables; ``forward`` takes
  token ids ``[b, s]`` and ``position_ids [b, 2, s]``.
- ``pre_process=False``: ``forward``'s first argument is the previous stage's hidden states ``[b, s, H]``
  (batch first, params dtype); ``position_ids`` is ignored (may be ``None``).
- ``post_process=True`` (last stage): holds ``final_layernorm`` and the head, returns logits
  ``[b, s, V/tp]``; otherwise ``forward`` returns hidden states ``[b, s, H]`` for the next stage.
- A last stage without ``pre_process`` still holds ``word_embeddings`` (the tied head weight, same init);
  its gradient must be summed with the first stage's over ``parallel_state.embedding_group``
  (:func:`all_reduce_tied_embedding_grads`).

Every stage receives the same ``attention_mask`` (``[b]`` sep values or ``[b, 1, s, s]`` bool) and builds
its mask itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.layout import ModelLayout
from megatron_glm.model.loss import GLMLoss, glm_loss_at, glm_loss_fused, loss_positions
from megatron_glm.model.masks import AttentionMask, prepare_attention_mask
from megatron_glm.model.transformer import GLMTransformer, KVCacheLike
from megatron_glm.parallel import (
    MODEL_PARALLEL_RNG,
    ParallelState,
    RNGStatesTracker,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    model_parallel_seed,
    normal_init,
    scatter_to_sequence_parallel_region,
    stable_seed,
)
from megatron_glm.parallel.random import InitMethod


def init_method_for(name: str, layout: ModelLayout, seed: int) -> InitMethod:
    """The init of parameter ``name`` (original GLM state-dict name) as the layout says: N(0, init_std), output
    projections N(0, init_std / sqrt(2 L)); drawn for the full tensor from a generator seeded by (seed, name)."""
    return normal_init(layout.init_std(name), stable_seed(seed, name))


class GLMModel(nn.Module):
    """GLM (Du et al. 2022) with tensor parallelism and pipeline-stage construction.

    Args:
        config: the architecture; ``vocab_size`` must already be resolved (> 0, divisible by the TP size).
        parallel_state: groups and ranks (``None``: single process).
        pre_process / post_process: this stage holds the embeddings / the final norm and head.
        layer_start, layer_end: the global layer range held (default: all layers).
        seed: initialisation seed (weights identical for every TP size and pipeline split) and the seed of
            the tensor-parallel dropout stream (``model_parallel_seed(seed, tp_rank)``).
        params_dtype, device: parameter dtype and device (``None``: CPU).
    """

    def __init__(self, config: ModelConfig, parallel_state: ParallelState | None = None, *,
                 pre_process: bool = True, post_process: bool = True, layer_start: int = 0,
                 layer_end: int | None = None, seed: int = 1234, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        ps = parallel_state or ParallelState()
        layer_end = config.num_layers if layer_end is None else layer_end
        _check(config, ps, layer_start, layer_end)
        self.config, self.parallel_state, self.seed = config, ps, seed
        self.layout = ModelLayout(config)
        self.pre_process, self.post_process = pre_process, post_process
        init_for = lambda name: init_method_for(name, self.layout, seed)
        if pre_process or post_process:
            self.word_embeddings = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, init_method=init_for("word_embeddings.weight"),
                parallel_state=ps, params_dtype=params_dtype, device=device)
        self.transformer = GLMTransformer(
            num_layers=config.num_layers, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
            max_sequence_length=config.max_sequence_length, layernorm_epsilon=config.layernorm_epsilon,
            attention_dropout=config.attention_dropout, hidden_dropout=config.hidden_dropout,
            attention_impl=config.attention_impl, block_position_encoding=config.block_position_encoding,
            checkpoint_activations=config.checkpoint_activations,
            checkpoint_num_layers=config.checkpoint_num_layers,
            recompute_granularity=config.recompute_granularity, layer_start=layer_start, layer_end=layer_end,
            pre_process=pre_process, post_process=post_process, init_for=init_for, parallel_state=ps,
            params_dtype=params_dtype, device=device)
        self.rng_tracker = self._new_tracker(device)
        # Sequence parallelism applies to training/eval forwards; generation (a KV cache) runs without it.
        self.sequence_parallel = config.sequence_parallel and ps.tp_size > 1

    @classmethod
    def from_pretrained(cls, path: str, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> GLMModel:
        """A single-process model from a standalone directory (``config.json`` + ``model.safetensors``, as
        written by ``tools/convert_checkpoint.py --format safetensors``); no DeepSpeed needed. Eval mode."""
        from megatron_glm.checkpoint.formats.standalone import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype)

    def _new_tracker(self, device: torch.device | str | None) -> RNGStatesTracker:
        tracker = RNGStatesTracker(torch.device(device) if device is not None else "cpu")
        tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(self.seed, self.parallel_state.tp_rank))
        return tracker

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | AttentionMask | None = None, *,
                kv_cache: KVCacheLike | None = None, logit_positions: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None) -> torch.Tensor | GLMLoss:
        """Logits ``[b, s, V/tp]`` (last stage) or hidden states ``[b, s, H]`` (other stages).

        ``input_ids``: token ids ``[b, s]`` on the first stage, the previous stage's hidden states
        ``[b, s, H]`` otherwise (``[b, s/tp, H]``, this rank's sequence shard, with ``config.sequence_parallel``,
        which is also what a non-last stage returns). ``position_ids``: ``[b, 2, s]`` (position, block position).
        ``attention_mask``: ``[b]`` integer ``sep`` (Part A length) or boolean ``[b, 1, s, s]``
        (True = may attend).

        ``kv_cache`` (generation, optional): a cache holding ``kv_cache.length`` earlier positions
        (``megatron_glm.generation.KVCache``); the ``s`` new positions attend to those and to each other,
        and their keys/values are appended. ``attention_mask`` is then ``[b, 1, s, length + s]``
        (a ``[b]`` sep tensor is accepted while the cache is empty). ``None`` (default): unchanged.

        ``logit_positions`` (training, optional): flat indices into ``b * s`` (e.g. the loss positions from
        :func:`~megatron_glm.model.loss.loss_positions`); the head then runs on those rows only and the
        logits are ``[n, V/tp]``. GLM's loss covers Part B only, so Part A rows never need the head.

        ``labels`` and ``loss_mask`` (training, last stage, optional, both ``[b, s]``): return the
        :class:`~megatron_glm.model.loss.GLMLoss` instead of logits, the head run on the loss rows only;
        with ``config.head_chunk_size > 0`` fused into the cross entropy in chunks of that many rows
        (:func:`~megatron_glm.model.loss.glm_loss_fused`, no ``[n, V]`` logits stored).
        """
        if (labels is None) != (loss_mask is None):
            raise ValueError("labels and loss_mask must be given together")
        if attention_mask is None:
            raise ValueError("attention_mask is required ([b] sep values or a [b, 1, s, s] boolean mask)")
        if self.pre_process:
            if position_ids is None:
                raise ValueError("position_ids [b, 2, s] is required on the first stage")
            h = self.transformer.embed(self.word_embeddings(input_ids), position_ids)
        else:
            h = input_ids
        if h.device.type != self.rng_tracker.device.type:  # moved with .to(); reseed on the new device
            self.rng_tracker = self._new_tracker(h.device)
        group = self.parallel_state.tp_group
        seq_parallel = self.sequence_parallel and kv_cache is None
        b, s = h.shape[0], h.shape[1] * (self.parallel_state.tp_size if seq_parallel and not self.pre_process else 1)
        if kv_cache is None:
            mask = prepare_attention_mask(attention_mask, b, s, h.device)
            if seq_parallel:
                h = scatter_to_sequence_parallel_region(h, group) if self.pre_process else h
                h = self.transformer(h, mask, self.rng_tracker, sequence_parallel=True)
                if self.post_process:
                    h = gather_from_sequence_parallel_region(h, group, reduce_grad=False)
            else:
                h = self.transformer(h, mask, self.rng_tracker)
        else:
            mask = prepare_attention_mask(attention_mask, b, s, h.device, kv_seq=kv_cache.length + s)
            h = self.transformer(h, mask, self.rng_tracker, kv_cache=kv_cache)
        if not self.post_process:
            return h
        if labels is not None:
            return self.head_loss(h, labels, loss_mask)
        if logit_positions is not None:
            h = h.reshape(b * s, h.shape[-1]).index_select(0, logit_positions)
        return self.logits(h)

    def compile_layers(self, **kwargs: object) -> None:
        """``torch.compile`` every transformer layer in place (names and state dict unchanged).

        On CPU (inductor + gcc) the first step pays ~20 s of compilation per distinct layer shape.
        """
        for layer in self.transformer.layers.values():
            layer.compile(**kwargs)

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> GLMLoss:
        """The GLM loss of final hidden states ``h [b, s, H]``: the head on the ``loss_mask`` rows only,
        fused and chunked when ``config.head_chunk_size > 0``."""
        b, s = labels.shape
        positions = loss_positions(loss_mask)
        rows = h.reshape(b * s, h.shape[-1]).index_select(0, positions)
        chunk = self.config.head_chunk_size
        if chunk <= 0:
            return glm_loss_at(self.logits(rows), positions, labels, loss_mask, self.parallel_state)
        rows = copy_to_tensor_parallel_region(rows, self.parallel_state.tp_group)
        return glm_loss_fused(rows, self.word_embeddings.weight, positions, labels, loss_mask, self.parallel_state,
                              chunk=chunk)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied head: ``h @ word_embeddings.T`` for this rank's vocabulary slice."""
        h = copy_to_tensor_parallel_region(h, self.parallel_state.tp_group)
        return F.linear(h, self.word_embeddings.weight)


def _check(config: ModelConfig, ps: ParallelState, layer_start: int, layer_end: int) -> None:
    if config.vocab_size <= 0:
        raise ValueError("config.vocab_size must be resolved (> 0) before building the model")
    if config.vocab_size % ps.tp_size:
        raise ValueError(f"vocab_size {config.vocab_size} is not divisible by the tensor-parallel size {ps.tp_size}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by {config.num_attention_heads} heads")
    if not 0 <= layer_start <= layer_end <= config.num_layers:
        raise ValueError(f"layer range [{layer_start}, {layer_end}) is outside [0, {config.num_layers})")


def all_reduce_tied_embedding_grads(model: GLMModel) -> None:
    """Sum the word-embedding gradient of the first and last pipeline stage (tied head).

    Call after backward on every rank of a pipeline with ``pp_size > 1``; a no-op otherwise.
    """
    ps = model.parallel_state
    group = ps.embedding_group
    if ps.pp_size == 1 or group is None or not (model.pre_process or model.post_process):
        return
    grad = model.word_embeddings.weight.grad
    if grad is None:
        grad = model.word_embeddings.weight.grad = torch.zeros_like(model.word_embeddings.weight)
    dist.all_reduce(grad, group=group)


def flops_per_token(config: ModelConfig, seq_length: int, *, training: bool = True,
                    num_layers: int | None = None) -> float:
    """Model FLOPs per token (matmuls only, dense attention, no recomputation counted).

    Per layer forward: ``24 H^2`` (QKV, dense, MLP) ``+ 4 s H`` (scores and context); head ``2 H V``.
    Training (forward + backward) is three times the forward.
    """
    h, layers = config.hidden_size, config.num_layers if num_layers is None else num_layers
    forward = layers * (24 * h * h + 4 * seq_length * h) + 2 * h * config.vocab_size
    return 3.0 * forward if training else float(forward)
