"""Activation memory per rank of a training step: what the forward keeps for backward, from the layer specs.

Megatron's estimate (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models") is
``s b h (34 + 5 a s / h)`` bytes per layer in 16-bit with 1-byte dropout masks; ``34 = 2 x 16`` elements (two
norm inputs, the QKV and MLP inputs, Q, K, V, the context, the two 4h MLP tensors) plus two masks, ``5 a s / h``
the scores (softmax output, its dropout mask and output). Adapted to our layer, per layer and micro-batch, with
``s' = s / cp`` the tokens of a context-parallel rank, ``w`` the bytes of the training dtype, ``m`` those of a
dropout mask (1 on CUDA, ``w`` on a CPU, whose dropout keeps a mask of the input's dtype), ``t`` the TP size,
``t_sp = t`` under sequence parallelism (else 1), sizes in units of ``h`` (``q = a d / h`` the query width,
``k = g d / h`` the key/value width of ``g`` groups, ``f = ffn / h``)::

    linear  = s' b h [ w (N / t_sp + 2 + (C + O + q + M) / t) + m D / t_sp ]
    scores  = b (a / t) s' s (4 + w + m [attention dropout])     eager / layer-scaled fp32 softmax
            = b (a / t) s' s (2 w + m)                           sdpa with attention dropout on a CPU (math path)
    bias    = w b s' s                                           sdpa's explicit mask (GLM's mask), as a bias

- ``N``: the norms' saved inputs, ``n`` per norm (LayerNorm 1, RMSNorm 2: input and normalised), two norms per
  layer (four with sandwich norms); ``2``: the QKV and MLP inputs (whole sequence under SP: all-gathered);
- ``C``: Q, K, V as the attention core keeps them: the rotated Q and K, the keys and values repeated to the heads
  under grouped-query attention, and the whole QKV output ``q + 2 k`` while a view of it is kept (multi-head
  values; Q without rotary); QK-norm adds ``2 (q + k)``;
- ``O = q``: a fused kernel's output (sdpa, flex); ``q``: the context, input of the output projection;
- ``M``: the MLP, ``4 f`` with a GLU (the ``2 f`` projection, its activated half and the product), else ``2 f``;
- ``D = 2`` dropout masks (attention and MLP outputs) with hidden dropout.

Context parallelism (``cp > 1``), as :mod:`~megatron_glm.model.attention` runs it. The ring (``context_parallel_comm
ring`` and no attention dropout; any kernel) keeps the local rotated Q, the local K and V (``2 k``, never repeated),
the output (``O = q``) and a fp32 log-sum-exp per row and head (``scores = 4 b (a / t) s'``): no ``[s', s]`` term;
its backward holds fp32 dQ, the visiting block's dK, dV per head and the travelling ``2 k`` (``4 s' b h (3 q + 2 k)
/ t``) and three fp32 score tiles of ``min(TILE_ELEMENTS, b (a / t) s' s')``. The gather keeps K and V over the
``s`` keys (``2 cp q``, repeated to the heads, under GQA; ``2 cp k`` else) and the scores or mask bias above; with
attention dropout (always gathered) the probabilities and the dropout mask, both ``w`` (``scores = b (a / t) s' s
2 w``, no bias, ``O = q``), while forward draws the mask of the whole ``[b, a / t, s, s]`` next to the fp32 scores
(the working set ``b (a / t) s' s (4 + 2 (cp - 1) w)``, also backward's fp32 scores gradient). The QKV output stays
kept while Q is a view of it (no rotary): ``q + 2 k``.

Recompute: none keeps ``linear + scores + bias`` per layer; selective (the attention core) keeps ``linear`` less
``O`` (Megatron's ``34 s b h / t`` with SP, where our all-gathered QKV and MLP inputs stay whole), and backward
recomputes one layer's core (``scores + bias + O``);
full keeps the input of every checkpointed chunk (``w s' b h / t_sp`` per ``checkpoint_num_layers`` layers, 2
``s b h`` bytes per layer in Megatron's terms) and backward recomputes one chunk (its no-recompute activations).
Backward also holds the fp32 gradient of one layer's materialised scores (``4 b (a / t) s' s``, eager).

Outside the layers: the embedding-dropout mask (first stage); the final norm, the head's input and the loss's fp32
softmax over the loss rows ``b s' x V / t x 4`` bytes (every row a loss row, as the causal objective; GLM's blank
infilling has about half; nothing with the fused head, ``head_chunk_size``) on the last stage. Under pipeline
parallelism the first stage holds ``min(pp, micro-batches)`` micro-batches (1F1B); the figure is the busiest
stage's. An upper bound where the last layer runs on the loss rows only (``last_layer_loss_rows``). Not counted:
gradient buffers, communication buffers, the allocator's fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_glm.config import ModelConfig
from megatron_glm.model.ring_attention import TILE_ELEMENTS

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class StepShape:
    """What one rank runs: ``micro_batch_size`` sequences of ``seq_length`` tokens (the global sequence; a
    context-parallel rank holds ``seq_length / cp``), the parallel sizes, the dtype and the device kind."""

    seq_length: int
    micro_batch_size: int = 1
    tp: int = 1
    cp: int = 1
    pp: int = 1
    precision: str = "bf16"
    device_type: str = "cuda"
    micro_batches: int = 1  # per step (gradient accumulation): bounds the micro-batches in flight


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes per rank on the busiest pipeline stage (see the module doc)."""

    recompute: str  # none, selective or full
    per_layer: float  # one layer's activations without recompute, one micro-batch
    layers: int  # transformer layers on the busiest stage
    kept: float  # what the stage keeps for backward, one micro-batch
    in_flight: int  # micro-batches held at once
    working: float  # backward's recompute working set

    @property
    def stored(self) -> float:
        return self.kept * self.in_flight

    @property
    def peak(self) -> float:
        return self.stored + self.working

    def describe(self) -> str:
        gib = 1024.0**3
        flight = f" x {self.in_flight} micro-batches in flight" if self.in_flight > 1 else ""
        return (
            f"{self.peak / gib:.2f} GiB (recompute {self.recompute}: kept {self.kept / gib:.2f} GiB per micro-batch"
            f"{flight} over {self.layers} layers, {self.per_layer / gib:.3f} GiB per layer without recompute; "
            f"backward working set {self.working / gib:.2f} GiB)"
        )


def recompute_of(config: ModelConfig) -> str:
    """``none``, ``selective`` or ``full``, from the recompute options."""
    if config.recompute_granularity == "full" or config.checkpoint_activations:
        return "full"
    return config.recompute_granularity or "none"


def _sp(config: ModelConfig, shape: StepShape) -> int:
    """``t_sp``: the TP size under sequence parallelism (norms, dropouts, residuals on sequence shards), else 1."""
    return shape.tp if config.sequence_parallel and shape.tp > 1 else 1


def cp_comm(config: ModelConfig, shape: StepShape) -> str:
    """How attention meets the other context-parallel ranks' keys and values: ``ring`` (``context_parallel_comm``
    ring, no attention dropout), ``gather``, or ``""`` without context parallelism."""
    if shape.cp == 1:
        return ""
    return "ring" if config.context_parallel_comm == "ring" and config.attention_dropout == 0 else "gather"


def _core_inputs(config: ModelConfig, comm: str = "", cp: int = 1) -> float:
    """Q, K, V as the attention core keeps them, in units of ``h`` (``C`` of the module doc)."""
    q = config.num_attention_heads * config.head_dim / config.hidden_size
    k = config.query_groups * config.head_dim / config.hidden_size
    gqa, rot = config.query_groups != config.num_attention_heads, config.rotary
    norm = 2 * (q + k) if config.qk_norm else 0.0
    if comm:  # new K and V: the ring's local ones (never repeated), or gathered over the S keys (repeated under GQA)
        kv = 2 * k if comm == "ring" else 2 * cp * (q if gqa else k)
        return q * rot + kv + (q + 2 * k if not rot else 0.0) + norm  # the QKV output kept while Q is a view of it
    new = q * rot + (q if gqa else k * rot) + (q if gqa else 0.0)
    buffer = q + 2 * k if (not gqa or not rot) else 0.0
    return new + buffer + norm


def _layer_terms(config: ModelConfig, shape: StepShape) -> tuple[float, float, float, float]:
    """``(linear without O, O, scores + bias, the scores' fp32 gradient in backward)`` bytes of one layer, one
    micro-batch."""
    t, w = shape.tp, BYTES[shape.precision]
    m = 1 if shape.device_type == "cuda" else w
    t_sp = _sp(config, shape)
    s_local, b = shape.seq_length / shape.cp, shape.micro_batch_size
    h, a = config.hidden_size, config.num_attention_heads
    sbh = s_local * b * h
    q, k = a * config.head_dim / h, config.query_groups * config.head_dim / h
    f = config.ffn_size / h
    norms = (1 if config.normalization == "LayerNorm" else 2) * (4 if config.sandwich_norm else 2)
    masks = 2 if config.hidden_dropout > 0 else 0
    mlp = (4 if config.glu else 2) * f
    comm = cp_comm(config, shape)
    linear = sbh * (w * (norms / t_sp + 2 + (_core_inputs(config, comm, shape.cp) + q + mlp) / t) + m * masks / t_sp)
    fused_out = sbh * w * q / t if config.attention_impl != "eager" or comm else 0.0
    dropout = config.attention_dropout > 0
    layer_scaled = w != 4 and (config.attention_softmax_in_fp32 or config.apply_query_key_layer_scaling)
    scores = b * (a / t) * s_local * shape.seq_length
    if comm == "ring":  # the log-sum-exp; backward: fp32 dQ, the block's dK, dV (per head, and travelling), tiles
        tile = min(TILE_ELEMENTS, b * (a / t) * s_local * s_local)
        return linear, fused_out, 4 * b * (a / t) * s_local, 4 * (sbh * (3 * q + 2 * k) / t + 3 * tile)
    if comm and dropout:  # the probabilities and the dropout mask (values' dtype); forward draws the [S, S] mask
        return linear, fused_out, scores * 2 * w, scores * (4 + 2 * (shape.cp - 1) * w)
    if config.attention_impl == "eager" or layer_scaled:
        return linear, fused_out, scores * (4 + w + m * dropout), scores * 4
    if dropout and shape.device_type != "cuda":
        return linear, fused_out, scores * (2 * w + m), 0.0
    bias = 0.0 if config.attention_impl == "flex" and not dropout else w * b * s_local * shape.seq_length
    return linear, fused_out, bias, 0.0


def _outside(config: ModelConfig, shape: StepShape, first: bool, last: bool) -> float:
    """Bytes outside the layers: the embedding-dropout mask (first stage), the final norm, head input and the loss's
    fp32 softmax over the loss rows (last stage)."""
    w, t_sp = BYTES[shape.precision], _sp(config, shape)
    sbh = shape.seq_length / shape.cp * shape.micro_batch_size * config.hidden_size
    out = 0.0
    if first and config.hidden_dropout > 0:
        out += sbh * (1 if shape.device_type == "cuda" else w) / t_sp
    if last:
        out += sbh * w * ((1 if config.normalization == "LayerNorm" else 2) / t_sp + 1)
        if not config.head_chunk_size:
            rows = shape.seq_length / shape.cp * shape.micro_batch_size
            out += rows * config.vocab_size / shape.tp * 4
    return out


def estimate_activation_memory(config: ModelConfig, shape: StepShape) -> ActivationEstimate:
    """Activation memory per rank of ``config`` run as ``shape`` (the module doc states the formula)."""
    recompute = recompute_of(config)
    linear, fused_out, quadratic, grad = _layer_terms(config, shape)
    per_layer = linear + fused_out + quadratic
    pp, layers_total = shape.pp, config.num_layers
    counts = [sum(1 for i in range(layers_total) if min(pp - 1, i * pp // layers_total) == st) for st in range(pp)]
    chunk = max(1, config.checkpoint_num_layers)
    chunk_input = shape.seq_length / shape.cp * shape.micro_batch_size * config.hidden_size
    chunk_input *= BYTES[shape.precision] / _sp(config, shape)
    best: ActivationEstimate | None = None
    for stage, layers in enumerate(counts):
        if recompute == "full":
            kept, working = math.ceil(layers / chunk) * chunk_input, min(chunk, layers) * per_layer + grad
        elif recompute == "selective":
            kept, working = layers * linear, quadratic + fused_out + grad
        else:
            kept, working = layers * per_layer, grad
        kept += _outside(config, shape, stage == 0, stage == pp - 1)
        flight = max(1, min(pp - stage, shape.micro_batches))
        est = ActivationEstimate(recompute, per_layer, layers, kept, flight, working)
        if best is None or est.peak > best.peak:
            best = est
    assert best is not None
    return best
