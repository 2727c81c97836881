"""Named GLM model sizes, as data (published layers / hidden / heads / positions / padded vocab and, for the
later family, the architecture options of the release)."""

from __future__ import annotations

from types import MappingProxyType

#: The architecture options of each later family member (everything but its shape), as its release has them.
FAMILY_OPTIONS = MappingProxyType(
    {
        "glm-130b": dict(
            position_embedding_type="rope",
            activation="geglu",
            residual_style="deepnorm",
            apply_query_key_layer_scaling=True,
            attention_softmax_in_fp32=True,
            embedding_grad_shrink=0.1,
        ),
        "chatglm-6b": dict(
            position_embedding_type="rope_2d",
            residual_style="post_ln_alpha",
            apply_query_key_layer_scaling=True,
            attention_softmax_in_fp32=True,
        ),
        "chatglm2-6b": dict(
            position_embedding_type="rope",
            rotary_percent=0.5,
            rotary_interleaved=True,
            activation="swiglu",
            normalization="RMSNorm",
            add_bias_linear=False,
            untie_embeddings_and_output_weights=True,
            apply_query_key_layer_scaling=True,
            attention_softmax_in_fp32=True,
        ),
        "glm-4-0414": dict(
            position_embedding_type="rope",
            rotary_percent=0.5,
            rotary_interleaved=True,
            activation="swiglu",
            normalization="RMSNorm",
            add_bias_linear=False,
            untie_embeddings_and_output_weights=True,
            attention_softmax_in_fp32=True,
            sandwich_norm=True,
        ),
        # GLM-4.5 family (glm-family.md): half-split partial rotary, theta 1e6, QKV bias only, untied, sigmoid
        # router with the correction bias, top-8, normalised weights, one shared expert.
        "glm-4.5": dict(
            position_embedding_type="rope",
            rotary_percent=0.5,
            rotary_base=1_000_000.0,
            activation="swiglu",
            normalization="RMSNorm",
            add_bias_linear=False,
            untie_embeddings_and_output_weights=True,
            attention_softmax_in_fp32=True,
            qk_norm=True,
            moe_top_k=8,
            num_shared_experts=1,
            moe_router_score="sigmoid",
            moe_norm_topk_prob=True,
            moe_router_bias=True,
        ),
    }
)

#: Multi-token-prediction layers of the releases (``num_nextn_predict_layers``); counted by
#: ``model/memory.py:parameter_counts`` until the model config records them.
MTP_LAYERS = MappingProxyType({"glm-4.5": 1, "glm-4.5-air": 1, "glm-4.6": 1})

_GLM45 = dict(
    num_layers=92,
    hidden_size=5120,
    num_attention_heads=96,
    kv_channels=128,
    num_query_groups=8,
    ffn_hidden_size=12288,
    moe_intermediate_size=1536,
    num_experts=160,
    first_k_dense_replace=3,
    moe_routed_scaling_factor=2.5,
    max_sequence_length=131072,
    vocab_size=151552,
)

MODEL_SIZES = MappingProxyType(
    {
        "glm-tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, max_sequence_length=512),
        "glm-base": dict(
            num_layers=12, hidden_size=768, num_attention_heads=12, max_sequence_length=512, vocab_size=30592
        ),
        "glm-large": dict(
            num_layers=24, hidden_size=1024, num_attention_heads=16, max_sequence_length=512, vocab_size=30592
        ),
        "glm-large-chinese": dict(
            num_layers=24, hidden_size=1024, num_attention_heads=16, max_sequence_length=1024, vocab_size=50048
        ),
        "glm-2b": dict(
            num_layers=36, hidden_size=2048, num_attention_heads=32, max_sequence_length=1024, vocab_size=50304
        ),
        "glm-10b": dict(
            num_layers=48, hidden_size=4096, num_attention_heads=64, max_sequence_length=1024, vocab_size=50304
        ),
        # The later family (glm-family.md): shapes of the released checkpoints, plus their architecture options.
        "glm-130b": dict(
            num_layers=70,
            hidden_size=12288,
            num_attention_heads=96,
            ffn_hidden_size=32768,
            max_sequence_length=2048,
            vocab_size=150528,
            **FAMILY_OPTIONS["glm-130b"],
        ),
        "chatglm-6b": dict(
            num_layers=28,
            hidden_size=4096,
            num_attention_heads=32,
            ffn_hidden_size=16384,
            max_sequence_length=2048,
            vocab_size=150528,
            **FAMILY_OPTIONS["chatglm-6b"],
        ),
        "chatglm2-6b": dict(
            num_layers=28,
            hidden_size=4096,
            num_attention_heads=32,
            kv_channels=128,
            num_query_groups=2,
            ffn_hidden_size=13696,
            max_sequence_length=32768,
            vocab_size=65024,
            **FAMILY_OPTIONS["chatglm2-6b"],
        ),
        # The GLM-4 generation (shapes from the published config.json files; docs/family.md).
        "chatglm3-6b": dict(
            num_layers=28,
            hidden_size=4096,
            num_attention_heads=32,
            kv_channels=128,
            num_query_groups=2,
            ffn_hidden_size=13696,
            max_sequence_length=8192,
            vocab_size=65024,
            **FAMILY_OPTIONS["chatglm2-6b"],
        ),
        "glm-4-9b": dict(
            num_layers=40,
            hidden_size=4096,
            num_attention_heads=32,
            kv_channels=128,
            num_query_groups=2,
            ffn_hidden_size=13696,
            max_sequence_length=131072,
            vocab_size=151552,
            layernorm_epsilon=1.5625e-07,
            rotary_base=5_000_000.0,  # rope_ratio 500
            **FAMILY_OPTIONS["chatglm2-6b"],
        ),
        "glm-4-9b-0414": dict(
            num_layers=40,
            hidden_size=4096,
            num_attention_heads=32,
            kv_channels=128,
            num_query_groups=2,
            ffn_hidden_size=13696,
            max_sequence_length=32768,
            vocab_size=151552,
            **FAMILY_OPTIONS["glm-4-0414"],
        ),
        "glm-4-32b-0414": dict(
            num_layers=61,
            hidden_size=6144,
            num_attention_heads=48,
            kv_channels=128,
            num_query_groups=2,
            ffn_hidden_size=23040,
            max_sequence_length=32768,
            vocab_size=151552,
            add_qkv_bias=False,
            **FAMILY_OPTIONS["glm-4-0414"],
        ),
        # GLM-4.5 family, Mixture-of-Experts (glm-family.md; published config.json files).
        "glm-4.5": dict(**_GLM45, **FAMILY_OPTIONS["glm-4.5"]),
        "glm-4.6": dict(**{**_GLM45, "max_sequence_length": 202752}, **FAMILY_OPTIONS["glm-4.5"]),
        "glm-4.5-air": dict(
            num_layers=46,
            hidden_size=4096,
            num_attention_heads=96,
            kv_channels=128,
            num_query_groups=8,
            ffn_hidden_size=10944,
            moe_intermediate_size=1408,
            num_experts=128,
            first_k_dense_replace=1,
            moe_routed_scaling_factor=1.0,
            max_sequence_length=131072,
            vocab_size=151552,
            **{**FAMILY_OPTIONS["glm-4.5"], "qk_norm": False},
        ),
    }
)
"""Published sizes. ``vocab_size`` is the padded vocab of the released checkpoints; a run with its own
tokenizer overrides it (``model.vocab_size: 0`` derives it from the tokenizer)."""
