"""Small shapes and batches shared by the model tests."""

from __future__ import annotations

import dataclasses

import torch

from megatron_glm.config import ModelConfig, build_config
from megatron_glm.config.sizes import FAMILY_OPTIONS

VOCAB = 128
SEQ = 16
BATCH = 3


def tiny_config(**overrides: object) -> ModelConfig:
    """glm-tiny (2 layers, H 64, 4 heads) with a 128-row vocab and no dropout unless overridden."""
    cfg = build_config({"model.size": "glm-tiny", "model.vocab_size": VOCAB}).model
    return dataclasses.replace(cfg, **{"hidden_dropout": 0.0, "attention_dropout": 0.0, **overrides})


def make_batch(seed: int = 0, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """A GLM-shaped batch: Part A of length ``sep`` then Part B with copied positions and block positions."""
    g = torch.Generator().manual_seed(seed)
    sep = torch.randint(2, seq - 2, (batch,), generator=g)
    sep[0] = seq // 2
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    pos = torch.zeros(batch, 2, seq, dtype=torch.long)
    loss_mask = torch.zeros(batch, seq)
    for i, n in enumerate(sep.tolist()):
        pos[i, 0, :n] = torch.arange(n)
        pos[i, 0, n:] = torch.randint(0, n, (1,), generator=g)
        pos[i, 1, n:] = torch.arange(1, seq - n + 1)
        loss_mask[i, n:] = 1.0
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "position_ids": pos, "sep": sep, "labels": labels, "loss_mask": loss_mask}


def random_full_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random full tensors for every key of ``model`` (non-zero biases, non-trivial LayerNorms)."""
    g = torch.Generator().manual_seed(seed)
    from megatron_glm.model import full_state_dict

    out = {}
    for name, t in sorted(full_state_dict(model).items()):
        base = 1.0 if name.endswith("layernorm.weight") else 0.0
        out[name] = base + 0.05 * torch.randn(t.shape, generator=g)
    return out


def pipe_parts(cfg: ModelConfig, ps=None, seed: int = 1234) -> list:
    """Every pipe layer of the layout as a :class:`GLMPart` (one shared dropout stream), in pipe order."""
    from megatron_glm.model import GLMPart, ModelLayout, new_rng_tracker
    from megatron_glm.parallel import ParallelState

    ps = ps or ParallelState()
    tracker = new_rng_tracker(seed, ps, None)
    return [GLMPart(p, cfg, ps, seed=seed, tracker=tracker) for p in ModelLayout(cfg).pipe_layers]


def run_parts(parts: list, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pipeline's forward, one part after the other: word and position embeddings, layers, norm, head."""
    h = parts[1].embed_positions(parts[0].embed_tokens(batch["input_ids"]), batch["position_ids"])
    for part in parts[2:-2]:
        h = part.run_layers(h, batch["sep"], batch["position_ids"])
    return parts[-1].logits(parts[-2].final_norm(h))


#: Tiny members of the GLM family (H 32, 2 layers; vocab 128): the options of each release at toy sizes, plus
#: two extra combinations (multi-query with a partial rotate-half rotary; interleaved 2-D rotary).
FAMILY = {
    "glm-130b": dict(
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=48,
        max_sequence_length=64,
        **FAMILY_OPTIONS["glm-130b"],
    ),
    "chatglm-6b": dict(
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        max_sequence_length=64,
        **FAMILY_OPTIONS["chatglm-6b"],
    ),
    "chatglm2-6b": dict(
        hidden_size=32,
        num_attention_heads=8,
        kv_channels=8,
        num_query_groups=4,
        ffn_hidden_size=40,
        max_sequence_length=64,
        **FAMILY_OPTIONS["chatglm2-6b"],
    ),
}
EXTRA_VARIANTS = {
    "mqa-rope-half": dict(
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=1,
        max_sequence_length=64,
        position_embedding_type="rope",
        rotary_percent=0.5,
        activation="geglu",
        normalization="RMSNorm",
        add_qkv_bias=False,
        untie_embeddings_and_output_weights=True,
    ),
    "rope2d-interleaved": dict(
        hidden_size=32,
        num_attention_heads=2,
        kv_channels=12,
        max_sequence_length=64,
        position_embedding_type="rope_2d",
        rotary_interleaved=True,
        rotary_base=500.0,
        activation="swiglu",
        residual_style="deepnorm",
    ),
}


def family_config(name: str, **overrides: object) -> ModelConfig:
    """A tiny member of the family (:data:`FAMILY` or :data:`EXTRA_VARIANTS`), no dropout."""
    options = {**FAMILY, **EXTRA_VARIANTS}[name]
    return tiny_config(**{**options, **overrides})
