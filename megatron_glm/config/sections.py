"""Typed configuration sections. Every field carries its help text in ``metadata["help"]`` (:func:`opt`).

``opt`` / ``opt_from`` (``config/fields.py``) and ``LoraConfig`` (``config/lora.py``) are re-exported here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from megatron_glm.config.context_parallel import ContextParallelOptions
from megatron_glm.config.fields import opt as opt
from megatron_glm.config.fields import opt_from as opt_from
from megatron_glm.config.lora import LORA_TARGETS as LORA_TARGETS
from megatron_glm.config.lora import LoraConfig as LoraConfig
from megatron_glm.config.moe import MoEOptions
from megatron_glm.config.mtp import MTPOptions

if TYPE_CHECKING:
    from megatron_glm.config.architecture import Architecture


class ModelShape:
    """Sizes implied by the architecture fields (shared by :class:`ModelConfig` and :class:`Architecture`)."""

    @property
    def head_dim(self) -> int:
        """Per-head dimension (``kv_channels`` or ``hidden_size / heads``)."""
        return self.kv_channels or self.hidden_size // max(1, self.num_attention_heads)

    @property
    def query_groups(self) -> int:
        """Key/value heads (``num_attention_heads`` without grouped-query attention)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """The MLP inner size (``ffn_hidden_size`` or 4 H)."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def glu(self) -> bool:
        return self.activation in ("geglu", "swiglu")

    @property
    def rotary(self) -> bool:
        return self.position_embedding_type != "learned_absolute"


@dataclass(kw_only=True)
class ModelConfig(MoEOptions, MTPOptions, ContextParallelOptions, ModelShape):
    """The GLM transformer: its architecture (every field that changes tensors or math, the MoE ones from
    :class:`MoEOptions`, the MTP ones from :class:`MTPOptions`; :meth:`architecture`, the sealed value a checkpoint
    records) and the execution options (fields with ``execution=True`` in their metadata: kernels, recomputation,
    sequence parallelism, loss rows; free to differ from run to run)."""

    size: str = opt(
        "",
        "Named size to start from (glm-tiny, glm-base, glm-large, glm-large-chinese, "
        "glm-2b, glm-10b, glm-130b, chatglm-6b, chatglm2-6b, chatglm3-6b, glm-4-9b, glm-4-9b-0414, "
        "glm-4-32b-0414, glm-4.5, glm-4.5-air, glm-4.6); explicit fields override it.",
        execution=True,
    )
    num_layers: int = opt(2, "Number of transformer layers.")
    hidden_size: int = opt(64, "Hidden size H.")
    num_attention_heads: int = opt(4, "Attention heads; must divide hidden_size.")
    vocab_size: int = opt(
        0,
        "Rows of the word embedding (padded vocab). 0: the tokenizer's vocab padded "
        "to a multiple of make_vocab_size_divisible_by x tensor_model_parallel_size.",
    )
    make_vocab_size_divisible_by: int = opt(
        128, "Pad the vocab to a multiple of this times the TP size.", execution=True
    )
    max_sequence_length: int = opt(512, "Maximum position; the position tables have this + 1 rows.")
    hidden_dropout: float = opt(0.1, "Dropout after the attention/MLP output projections and embeddings.")
    attention_dropout: float = opt(0.1, "Dropout on attention probabilities.")
    layernorm_epsilon: float = opt(1e-5, "LayerNorm epsilon.")
    init_std: float = opt(0.02, "Std of the normal init; output projections use init_std/sqrt(2L).")
    block_position_encoding: bool = opt(True, "Add the block-position embedding (row 1 of position_ids).")
    attention_impl: str = opt(
        "sdpa",
        "Attention kernel: sdpa (fused, default), flex (CUDA) or eager (reference, materialises the scores).",
        choices=("sdpa", "flex", "eager"),
        execution=True,
    )
    checkpoint_activations: bool = opt(False, "Recompute layer activations in backward to save memory.", execution=True)
    checkpoint_num_layers: int = opt(1, "Layers per activation-checkpoint chunk.", execution=True)
    recompute_granularity: str = opt(
        "",
        "Activation recomputation (Megatron's flag): '' none (full when "
        "checkpoint_activations), full (whole layers, checkpoint_num_layers at a "
        "time) or selective (the attention core only: scores, softmax, dropout).",
        choices=("", "full", "selective"),
        execution=True,
    )
    sequence_parallel: bool = opt(
        False,
        "Under tensor parallelism, run norms, dropouts and residuals on sequence "
        "shards (Megatron's): all-gather / reduce-scatter instead of all-reduce; "
        "needs seq_length divisible by the TP size; with pipeline parallelism the stages pass sequence shards.",
        execution=True,
    )
    head_chunk_size: int = opt(
        0,
        "Training: fuse the tied head into the cross entropy, this many loss rows at a "
        "time, so the [n, V] logits are never stored (0: one unfused head).",
        execution=True,
    )
    last_layer_loss_rows: bool = opt(
        True,
        "Training with the head on the loss rows: the last layer computes its queries, attention output and "
        "MLP on those rows only (keys and values on every row), since nothing else reads them. Exact: its "
        "dropout masks are drawn over every row and the rows' part kept (with attention dropout the attention "
        "core runs on every row). Ignored under sequence parallelism, and under pipeline parallelism when the last "
        "layer is not on the last stage. false: the whole last layer.",
        execution=True,
    )
    # -- GLM family architecture options (defaults: the 2021 GLM) ------------------------------------------
    position_embedding_type: str = opt(
        "learned_absolute",
        "Positions: learned_absolute (position + block-position tables, GLM), rope (1-D rotary on "
        "position_ids row 0, GLM-130B) or rope_2d (ChatGLM-6B: one half of each head's dims rotated by "
        "the position, the other half by the block position). Rotary models have no position tables.",
        choices=("learned_absolute", "rope", "rope_2d"),
    )
    rotary_percent: float = opt(
        1.0, "Fraction of each head's dims that rotary rotates, in (0, 1] (ChatGLM2: 0.5; rope_2d: 1)."
    )
    rotary_base: float = opt(10000.0, "Rotary frequency base: theta_i = base^(-2i / rotary dims).")
    rotary_interleaved: bool = opt(
        False, "Rotate interleaved pairs (x[2i], x[2i+1]) as ChatGLM2, instead of the two halves (rotate-half)."
    )
    ffn_hidden_size: int = opt(
        0, "MLP inner size (0: 4 x hidden_size). With a GLU activation dense_h_to_4h is 2 x this wide."
    )
    activation: str = opt(
        "gelu",
        "MLP activation: gelu (tanh GeLU, GLM), geglu (x1 * erf-gelu(x2) over the two halves of "
        "dense_h_to_4h, GLM-130B) or swiglu (silu(x1) * x2, ChatGLM2).",
        choices=("gelu", "geglu", "swiglu"),
    )
    normalization: str = opt(
        "LayerNorm",
        "Norm of every layer and the final norm: LayerNorm or RMSNorm (no bias).",
        choices=("LayerNorm", "RMSNorm"),
    )
    residual_style: str = opt(
        "pre_ln",
        "Residual/norm placement: pre_ln (h + f(LN(h)), GLM); post_ln_alpha (x = LN(h); h = alpha x + "
        "f(x), alpha = sqrt(2 L), ChatGLM-6B); deepnorm (the same forward, which is DeepNorm's post-LN "
        "x = LN(alpha x + f(x)) chained, plus DeepNorm's init: Xavier-normal matrices, the value part of QKV, "
        "attention dense and both MLP matrices scaled by beta = (2 L)^-0.5, GLM-130B).",
        choices=("pre_ln", "post_ln_alpha", "deepnorm"),
    )
    sandwich_norm: bool = opt(
        False,
        "GLM-4-0414's sandwich norms (pre_ln only): h = h + N_post_attn(Attn(N1(h))); h = h + N_post_mlp(MLP(N2(h))), "
        "with post_self_attn_layernorm and post_mlp_layernorm per layer (hidden dropout after the post-norm).",
    )
    qk_norm: bool = opt(
        False,
        "GLM-4.5's QK-norm: a norm of kind normalization (eps layernorm_epsilon) over each head's head_dim, on "
        "queries and keys after the QKV split and before the rotary rotation (attention.q_norm, attention.k_norm).",
    )
    num_query_groups: int = opt(
        0, "Key/value groups for grouped-query attention (0: multi-head; 1: multi-query; ChatGLM2: 2)."
    )
    group_query_attention: bool = opt(
        False, "Megatron's switch for grouped-query attention; needs num_query_groups > 0 (which alone suffices)."
    )
    kv_channels: int = opt(0, "Head dimension (0: hidden_size / num_attention_heads).")
    add_qkv_bias: bool = opt(True, "Bias on the fused QKV projection.")
    add_bias_linear: bool = opt(True, "Bias on the attention output and both MLP projections (--disable-bias-linear).")
    attention_softmax_in_fp32: bool = opt(
        False,
        "Under bf16/fp16, compute attention scores and softmax in fp32 with the explicit kernel (fp32 "
        "training already does; the fused kernels keep fp32 accumulators).",
    )
    apply_query_key_layer_scaling: bool = opt(
        False,
        "Scale scores by 1 / (sqrt(d) x layer number) in the compute dtype, multiply back in fp32 before "
        "the fp32 softmax (GLM-130B, ChatGLM); a no-op in fp32 training.",
    )
    embedding_grad_shrink: float = opt(
        1.0,
        "GLM-130B's embedding gradient shrink alpha in (0, 1]: emb = alpha emb + (1 - alpha) emb.detach() "
        "(forward unchanged, word-embedding gradient x alpha; 1: off; GLM-130B: 0.1).",
    )
    untie_embeddings_and_output_weights: bool = opt(
        False, "A separate output layer (output_layer.weight [V, H]) instead of the tied word embedding."
    )
    extra_options: list[str] = opt(
        [],
        "Architecture options outside the named fields, by name (experiments, tests): a builder enables its part "
        "with one (model/builders.py); recorded and checked like every field. Unknown names are refused.",
    )

    def architecture(self) -> Architecture:
        """The architecture of this model as one sealed value (every field but the execution options)."""
        from megatron_glm.config.architecture import ARCHITECTURE_FIELDS, Architecture  # built from this class

        return Architecture(**{name: getattr(self, name) for name in ARCHITECTURE_FIELDS})

    def with_architecture(self, arch: Architecture) -> ModelConfig:
        """A copy with every architecture field from ``arch`` and this config's execution options."""
        return replace(self, **arch.to_dict())


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model and data are split over processes."""

    tensor_model_parallel_size: int = opt(1, "Tensor-parallel size (ranks that split each layer).")
    pipeline_model_parallel_size: int = opt(1, "Pipeline-parallel size (stages of layers).")
    data_parallel_size: int = opt(0, "Data-parallel size; 0 derives world_size / (tp x pp x cp).")
    expert_parallel_size: int = opt(
        1,
        "Expert-parallel size: ranks splitting each MoE layer's experts (all-to-all); divides the data-parallel size.",
    )
    context_parallel_size: int = opt(
        1, "Context-parallel size: ranks that split every sequence (seq_length / CP tokens each, divisible by 2 x CP)."
    )
    pipeline_partition_method: str = opt(
        "uniform", "Pipeline partitioning: uniform (layers) or parameters.", choices=("uniform", "parameters")
    )


@dataclass(kw_only=True)
class ObjectiveConfig:
    """The objective mixture: GLM's blank infilling (original GLM flag names and defaults) and the causal
    objective of GLM-4 (``[gMASK]<sop>`` then the text, causal attention, loss on every text token)."""

    bert_prob: float = opt(0.5, "Probability of the token-level ([MASK]) objective.")
    gap_sentence_prob: float = opt(0.0, "Probability of the sentence-level ([sMASK]) objective.")
    causal_prob: float = opt(
        0.0,
        "Probability of the causal objective (GLM-4's input format: [gMASK]<sop> then the text, causal attention, "
        "1-D positions, next-token loss on every text token and on the end of text closing a document). The "
        "document-level blank objective takes what bert_prob, gap_sentence_prob and causal_prob leave.",
    )
    causal_datasets: list[str] = opt(
        [],
        "Dataset prefixes (as written in data.data_path) whose samples always use the causal objective; the "
        "mixture applies to the others.",
    )
    gap_sentence_ratio: float = opt(0.15, "Fraction of tokens covered by sentence blanks.")
    mask_ratio: float = opt(0.15, "Fraction of tokens covered by token-level blanks.")
    gpt_infill_prob: float = opt(
        0.5,
        "Document objective: probability that the span is a suffix (the original's "
        "naming; packed documents always use a suffix).",
    )
    gpt_min_ratio: float = opt(0.5, "Document objective: minimum span length as a fraction of the document.")
    avg_block_length: float = opt(3.0, "Poisson mean of token-level span lengths.")
    max_block_length: int = opt(39, "Longest token-level span.")
    block_mask_prob: float = opt(0.0, "Probability of masking tokens inside Part B input spans.")
    context_mask_ratio: float = opt(0.0, "Fraction of Part A tokens additionally replaced by [MASK].")
    short_seq_prob: float = opt(0.0, "Probability of cutting a shorter window (remaining positions padded).")
    single_span_prob: float = opt(0.0, "Token objective: probability of masking one span only.")
    task_mask: bool = opt(True, "Use [sMASK]/[gMASK] for sentence/document blanks (else [MASK]).")
    shuffle_block: bool = opt(True, "Shuffle the Part B spans (False: --no-shuffle-block).")
    block_position: bool = opt(
        True, "Emit block positions 1..k+1 in Part B (False: --no-block-position, all 1 in Part B as the original)."
    )
    sentinel_token: bool = opt(False, "Original --sentinel-token variant (not supported yet; must stay false).")
    per_sample: bool = opt(False, "Choose the objective per sample instead of once per micro-batch.")
    reset_attention_mask: bool = opt(
        False,
        "Document isolation in packed windows (Megatron's --reset-attention-mask): a token attends only to "
        "tokens of its own document (the GLM mask intersected with the document blocks; a Part B token "
        "belongs to the document its input token comes from). Samples then carry doc_ids and the model gets "
        "a [b, 1, s, s] mask. Positions are not reset, except by the causal objective (they restart at 0 in "
        "every document).",
    )


@dataclass(kw_only=True)
class DataConfig:
    """Corpus, tokenizer and sample construction."""

    data_path: list[str] = opt([], "Dataset prefixes, optionally weighted: [0.3, A, 0.7, B].")
    split: str = opt("949,50,1", "Train/valid/test weights over documents.")
    seq_length: int = opt(512, "Tokens per sample.")
    tokenizer_model: str = opt(
        "",
        "The tokenizer: a sentencepiece model, a tokenizer.json (or a folder holding one) or a tiktoken BPE "
        "file; GLM's command tokens must be among its special tokens.",
    )
    cache_dir: str = opt("", "Where sample-index .npy files are cached (default: next to the data).")
    num_workers: int = opt(1, "DataLoader workers per rank.")
    pack_documents: bool = opt(True, "Pack several documents into one window ([CLS] start, eos between).")
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = opt(1e-4, "Peak learning rate.")
    min_lr: float = opt(0.0, "Floor of the decayed learning rate.")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    clip_grad: float = opt(1.0, "Gradient-norm clipping (0 disables).")
    lr_warmup_iters: int = opt(0, "Linear warmup steps (overrides lr_warmup_fraction when > 0).")
    lr_warmup_fraction: float = opt(0.01, "Warmup as a fraction of lr_decay_iters.")
    lr_decay_style: str = opt("cosine", "Decay after warmup.", choices=("linear", "cosine", "constant"))
    lr_decay_iters: int = opt(0, "Steps over which lr decays to min_lr (0: train_iters).")


@dataclass(kw_only=True)
class TrainingConfig:
    """Batch sizes, precision, length of training and the DeepSpeed engine."""

    micro_batch_size: int = opt(4, "Samples per micro-batch per data-parallel rank.")
    global_batch_size: int = opt(0, "Samples per optimizer step; 0: micro x dp x accumulation.")
    gradient_accumulation_steps: int = opt(0, "Micro-batches per step; 0: derived from global_batch_size.")
    train_iters: int = opt(100, "Optimizer steps to train.")
    seed: int = opt(1234, "Seed for initialisation, dropout and data sampling.")
    precision: str = opt("fp32", "Parameter/compute dtype.", choices=("fp32", "bf16", "fp16"))
    zero_stage: int = opt(1, "DeepSpeed ZeRO stage, unless the deepspeed_config JSON names one.")
    deepspeed_config: str = opt("", "Path of a DeepSpeed JSON config (batch fields are filled from ours).")
    local_rank: int = opt(-1, "Set by the deepspeed launcher.")
    distributed_timeout_minutes: int = opt(
        30, "Timeout of every collective (the process group's, as Megatron's --distributed-timeout-minutes)."
    )
    heartbeat_timeout: float = opt(
        30.0,
        "Seconds a peer rank (or the rendezvous store) may stay silent before every other rank stops with "
        "'lost contact with rank N': a killed, frozen or unreachable rank ends the job within about this "
        "long, on gloo and on NCCL (a heartbeat thread per rank; busy ranks keep beating). 0: off.",
    )
    deterministic: bool = opt(
        False,
        "Deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8, so SDPA "
        "takes its deterministic backward): what a bitwise resume needs on CUDA; costs speed.",
    )
    eval_interval: int = opt(1000, "Evaluate on the validation split every N steps (0: never).")
    eval_iters: int = opt(10, "Micro-batches per evaluation.")
    cpu_allocator: str = opt(
        "heap",
        "CPU runs on glibc: 'heap' serves large tensors from the malloc heap and keeps freed blocks for the next "
        "step (no fresh pages faulted in and unmapped every step; the resident set stays near the run's peak), "
        "'system' keeps glibc's defaults (megatron_glm.training.cpu_allocator). No effect on GPUs.",
        choices=("heap", "system"),
    )
    compile: bool = opt(
        False, "torch.compile the transformer layers (first step pays the compilation, reported separately in the log)."
    )
    max_nonfinite_steps: int = opt(20, "Stop with an error after this many consecutive non-finite steps.")
    exit_interval: int = opt(0, "Save and stop cleanly after a step divisible by N (0: never); resume with --load.")
    exit_duration_in_mins: float = opt(
        0.0,
        "Save and stop after the first step that ends past this many minutes "
        "since pretrain() started (all ranks agree; 0: no limit).",
    )
    skip_train_iteration_range: list[str] = opt(
        [],
        "Steps to step over, as inclusive ranges 'A-B' (1-based): their "
        "samples are consumed without a forward pass or an update; the "
        "LR schedule counts updates, so it does not advance either.",
    )


@dataclass(kw_only=True)
class CheckpointConfig:
    """Saving and loading."""

    save: str = opt("", "Directory to save checkpoints and metrics.jsonl to.")
    load: str = opt("", "Directory to resume from (its latest complete checkpoint).")
    save_interval: int = opt(0, "Save every N steps (0: only at the end).")
    keep_last: int = opt(3, "Keep the newest K checkpoints (0: keep all).")
    load_weights_only: bool = opt(
        False,
        "With load: take only the model weights of its newest checkpoint (e.g. a "
        "converted one without optimizer state, or to fine-tune); optimizer, LR "
        "schedule, step and data position start fresh.",
    )
    override_config: bool = opt(
        False,
        "Resume even though the data (fingerprint or path), tokenizer, sequence "
        "length, global batch, seed or split differ from the checkpoint's "
        "(without it such a resume is refused with the list of differences).",
    )
    override_architecture: list[str] = opt(
        [],
        "Architecture fields this run may set differently from the checkpoint it loads (resume, weights only, "
        "fine-tuning): rotary_base, max_sequence_length (alias max_position_embeddings) of a rotary model, and "
        "attention_softmax_in_fp32 / apply_query_key_layer_scaling (bf16 rounding only; long sequences need them "
        "off: fused kernels) (names, or one comma-separated value; logged). Dropouts, init_std and "
        "embedding_grad_shrink need no flag (they do not change what the weights compute); any other architecture "
        "field given on the command line must equal the checkpoint's.",
    )


@dataclass(kw_only=True)
class LoggingConfig:
    """Console, metrics.jsonl and TensorBoard logging."""

    log_interval: int = opt(10, "Log every N steps.")
    tensorboard_dir: str = opt("", "TensorBoard log directory (default: <save>/tensorboard when installed).")
    peak_tflops: float = opt(
        0.0,
        "Per-device peak TFLOP/s in the training dtype that the logged MFU divides by; 0: the datasheet's "
        "dense figure for a known GPU (H100/H200 SXM 989, H100 PCIe 756, A100 312, L40S 362 in bf16, ...), "
        "else a matmul measured on every device at start-up (on a shared CPU that comes out low, and the MFU "
        "can exceed 1).",
    )


@dataclass(kw_only=True)
class GLMConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    explicit: frozenset[str] = field(default=frozenset(), repr=False, compare=False, metadata={"internal": True})
    """The dotted paths the user set (YAML, command line, or a named size); filled by the loader, not an option.
    A checkpoint's architecture yields only to these (:func:`megatron_glm.config.architecture.adopt_architecture`)."""
