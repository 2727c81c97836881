"""Synthetic checkpoints for the conversion tests: a tiny GLM's full weights written as original GLM files."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_glm.model import GLMModel, ModelLayout
from megatron_glm.parallel import shard
from tests.model.helpers import make_batch, random_full_state_dict, tiny_config


def reference_model(seed: int = 0, **overrides: object) -> tuple[GLMModel, dict[str, torch.Tensor]]:
    """A single-process tiny GLM with random (non-trivial) weights, and its full state dict."""
    model = GLMModel(tiny_config(**overrides))
    sd = random_full_state_dict(model, seed)
    model.load_state_dict(sd)
    return model.eval(), sd


def write_glm_files(out: Path, full: dict[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    """Original-format files ``out/mp_rank_XX_model_states.pt`` ({"module": shard}); returns the shards."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    layout = ModelLayout(tiny_config(vocab_size=full["word_embeddings.weight"].shape[0]))
    for r in range(tp):
        sd = {}
        for name, t in full.items():
            spec = layout[name].partition
            sd[name] = shard(t, spec[0], r, tp, spec[1]).clone() if spec else t.clone()
        torch.save({"module": sd}, out / f"mp_rank_{r:02d}_model_states.pt")
        shards.append(sd)
    return shards


@torch.no_grad()
def logits_of(model: GLMModel, batch_seed: int = 1) -> torch.Tensor:
    b = make_batch(batch_seed)
    return model(b["input_ids"], b["position_ids"], b["sep"])
