"""The benchmarks' original-GLM reference step computes what GLMModel computes (fp32, same weights)."""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.original_glm import OriginalGLM, original_loss
from megatron_glm.config import build_config
from megatron_glm.model import GLMModel, glm_loss


def test_original_reference_matches_glm_model() -> None:
    cfg = build_config({"model.size": "glm-tiny", "model.vocab_size": 128}).model
    cfg = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)
    b, s = 3, 24
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 128, (b, s), generator=g), torch.randint(0, 128, (b, s), generator=g)
    sep = torch.tensor([5, 11, 20])
    pos = torch.stack([torch.arange(s).expand(b, s), (torch.arange(s)[None] >= sep[:, None]).long()], dim=1)
    loss_mask = (torch.arange(s)[None] >= sep[:, None]).float()
    ours = GLMModel(cfg, seed=3)
    heads, eps = cfg.num_attention_heads, cfg.layernorm_epsilon
    ref = OriginalGLM(cfg.num_layers, cfg.hidden_size, heads, 128, cfg.max_sequence_length + 1, eps)
    ref.load_state_dict(ours.state_dict())
    a = glm_loss(ours(ids, pos, sep), labels, loss_mask).loss
    o = original_loss(ref(ids, pos, sep), labels, loss_mask)
    a.backward()
    o.backward()
    torch.testing.assert_close(o, a, rtol=0, atol=1e-5)
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=0, atol=1e-5, msg=name)
