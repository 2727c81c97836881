"""FLOP and memory estimates counted from the layout's tensor specs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_glm.config import ModelConfig, build_config
from megatron_glm.config.sizes import MODEL_SIZES
from megatron_glm.model import GLMModel, ModelLayout, flops_per_token, matmul_parameters
from megatron_glm.model.memory import estimate_memory
from tests.model.helpers import tiny_config


def _formula(config: ModelConfig, seq: int, training: bool = True) -> float:
    """The per-token count as it was written before the specs: QKV, dense, MLP per layer; head ``2 H V``."""
    h, layers = config.hidden_size, config.num_layers
    q, kv, f = config.num_attention_heads * config.head_dim, config.query_groups * config.head_dim, config.ffn_size
    matmul = h * (q + 2 * kv) + q * h + h * f * (3 if config.glu else 2)
    forward = layers * (2 * matmul + 4 * seq * q) + 2 * h * config.vocab_size
    return 3.0 * forward if training else float(forward)


def _glm4_tiny(**overrides: object) -> ModelConfig:
    return tiny_config(
        num_query_groups=2,
        ffn_hidden_size=176,
        activation="swiglu",
        normalization="RMSNorm",
        position_embedding_type="rope",
        rotary_percent=0.5,
        rotary_interleaved=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        **overrides,
    )


@pytest.mark.parametrize("name", sorted(n for n in MODEL_SIZES if not MODEL_SIZES[n].get("num_experts")))
def test_spec_count_equals_the_old_formula_for_every_named_size(name: str) -> None:
    cfg = build_config({"model.size": name, "model.vocab_size": 50304}).model
    for seq in (512, 2048):
        for training in (True, False):
            assert flops_per_token(cfg, seq, training=training) == _formula(cfg, seq, training)
    one = dataclasses.replace(cfg, num_layers=1)
    assert flops_per_token(cfg, 1024, num_layers=1) == _formula(one, 1024)


def test_gqa_swiglu_untied_count_by_hand() -> None:
    cfg = _glm4_tiny()  # H 64, 4 heads of 16, 2 key/value groups, SwiGLU 176, 128-row vocab, untied, 2 layers
    qkv, dense, h_to_4h, four_h_to_h = (64 + 2 * 32) * 64, 64 * 64, 2 * 176 * 64, 64 * 176
    per_layer, head = qkv + dense + h_to_4h + four_h_to_h, 128 * 64
    assert matmul_parameters(ModelLayout(cfg)) == 2 * per_layer + head == 108_544 - 8 * 1024
    assert flops_per_token(cfg, 16, training=False) == 2 * (2 * per_layer + head) + 2 * 4 * 16 * 64
    # The 2-D matrices of the built model, word embedding excluded: what the specs count.
    model = GLMModel(cfg)
    built = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "word_embeddings" not in n)
    assert built == matmul_parameters(ModelLayout(cfg))


def test_mtp_layer_counted_by_hand() -> None:
    """GLM-4.5's shape (3 layers, the first dense, then MoE: 4 experts top-2 of F 32 and a shared one) with one MTP
    layer: its eh_proj, its decoder layer (an MoE layer: attention, router, 2 active experts, shared expert), its
    attention over the sequence and one more pass of the head; without MTP layers the count is the stack's alone."""
    moe = dict(num_layers=3, num_experts=4, moe_top_k=2, moe_intermediate_size=32, num_shared_experts=1)
    cfg = _glm4_tiny(**moe, first_k_dense_replace=1, qk_norm=True, num_nextn_predict_layers=1)
    h, f, s = 64, 32, 16
    attention = (64 + 2 * 32) * h + 64 * h  # QKV (4 heads, 2 key/value groups of 16) and dense
    dense_layer = attention + 3 * 176 * h
    moe_layer = attention + 4 * h + 2 * (3 * f * h) + 3 * f * h  # router, 2 of the 4 experts, shared expert
    head, eh_proj = 128 * h, h * 2 * h
    scores = 4 * s * 64  # scores and context per layer per token: 4 s nh hd
    stack = 2 * (dense_layer + 2 * moe_layer + head) + 3 * scores
    mtp = 2 * (eh_proj + moe_layer + head) + scores
    assert matmul_parameters(ModelLayout(cfg)) == dense_layer + 2 * moe_layer + head + eh_proj + moe_layer
    assert flops_per_token(cfg, s, training=False) == stack + mtp
    assert flops_per_token(cfg, s) == 3.0 * (stack + mtp)
    without = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    assert flops_per_token(without, s, training=False) == stack  # 0 MTP layers: the count before MTP was counted
    # the counted MTP weights are the built MTP layer's 2-D matrices (the 4 experts' counted as 2 of them)
    built = GLMModel(cfg)
    mtp_params = {n: p for n, p in built.named_parameters() if ".mtp." in n and p.dim() >= 2}
    total = sum(p.numel() // 2 if p.dim() == 3 else p.numel() for p in mtp_params.values())
    assert total == eh_proj + moe_layer


@pytest.mark.parametrize(
    "cfg",
    [tiny_config(), _glm4_tiny(), tiny_config(num_query_groups=2, activation="geglu")],
    ids=["glm", "glm4", "geglu"],
)
def test_count_equals_torch_flop_counter_on_a_forward(cfg: ModelConfig) -> None:
    """The FLOPs torch counts in a full-logit forward (every matmul, the attention's two as eager matmuls: torch
    counts no FLOPs for the CPU flash kernel) are the estimate."""
    model = GLMModel(dataclasses.replace(cfg, last_layer_loss_rows=False, attention_impl="eager")).eval()
    b, s = 2, 16
    pos = torch.zeros(b, 2, s, dtype=torch.long)
    pos[:, 0] = torch.arange(s)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (b, s)), pos, torch.full((b,), 5))
    assert counter.get_total_flops() == flops_per_token(cfg, s, training=False) * b * s


def test_memory_counts_every_spec_on_its_stage() -> None:
    cfg = _glm4_tiny(num_layers=4)
    layout = ModelLayout(cfg)
    model = GLMModel(cfg)
    one = estimate_memory(cfg, tp=1, pp=1, dp=1, zero_stage=0, precision="fp32")
    assert one.parameters == one.stage_parameters == sum(p.numel() for p in model.parameters())
    by_name = {n: math.prod(s.shape) for n, s in layout.tensors.items()}
    embeddings = by_name["word_embeddings.weight"]
    layer = sum(v for n, v in by_name.items() if n.startswith("transformer.layers.0."))
    last = 2 * layer + by_name["transformer.final_layernorm.weight"] + by_name["output_layer.weight"]
    assert estimate_memory(cfg, tp=1, pp=2, dp=1, zero_stage=0, precision="fp32").stage_parameters == max(
        embeddings + 2 * layer, last
    )
    # TP 2: split tensors halve, replicated ones (norms) do not
    split = sum(v // 2 if layout[n].split_dim is not None else v for n, v in by_name.items())
    assert estimate_memory(cfg, tp=2, pp=1, dp=1, zero_stage=0, precision="fp32").stage_parameters == split
    tied = tiny_config(num_layers=4)
    tied_pp = estimate_memory(tied, tp=1, pp=2, dp=1, zero_stage=0, precision="fp32")
    tied_layout = ModelLayout(tied)
    tied_layer = sum(
        math.prod(s.shape) for n, s in tied_layout.tensors.items() if n.startswith("transformer.layers.3.")
    )
    final = sum(
        math.prod(s.shape) for n, s in tied_layout.tensors.items() if n.startswith("transformer.final_layernorm")
    )
    vocab = math.prod(tied_layout["word_embeddings.weight"].shape)
    tables = sum(math.prod(s.shape) for n, s in tied_layout.tensors.items() if "position_embeddings" in n)
    # the first stage holds the embeddings, the last the tied head's copy of the word embedding
    assert tied_pp.stage_parameters == 2 * tied_layer + max(vocab + tables, final + vocab)
    assert estimate_memory(tied, tp=1, pp=4, dp=1, zero_stage=0, precision="fp32").stage_parameters == (
        tied_layer + vocab + tables
    )
