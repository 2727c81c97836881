"""KV-cache generation of every GLM family member equals recomputation (rotary keys are cached rotated)."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.generation import GenerationConfig, KVCache, generate
from megatron_glm.model import GLMModel, load_full_state_dict, sep_to_mask
from tests.generation.helpers import PROMPTS, TOKENS
from tests.model.helpers import FAMILY, family_config, make_batch, random_full_state_dict

torch.set_num_threads(1)


def _model(name: str) -> GLMModel:
    cfg = family_config(name)
    model = GLMModel(cfg, seed=0)
    load_full_state_dict(model, random_full_state_dict(model, 11))
    return model.eval()


@pytest.mark.parametrize("name", list(FAMILY))
def test_cached_forward_and_generation_equal_recompute(name: str) -> None:
    model = _model(name)
    batch = make_batch(4, batch=1, seq=16)
    ids, pos, sep = batch["input_ids"], batch["position_ids"], batch["sep"]
    n = int(sep[0])
    with torch.no_grad():
        full = model(ids, pos, sep)
        cache = KVCache(capacity=4)
        parts = [model(ids[:, :n], pos[:, :, :n], sep, kv_cache=cache)]
        for j in range(n, ids.shape[1]):
            mask = sep_to_mask(sep, ids.shape[1])[:, :, j : j + 1, : j + 1]
            parts.append(model(ids[:, j : j + 1], pos[:, :, j : j + 1], mask, kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=2e-5)
    cached = [r.answers for r in generate(model, PROMPTS, TOKENS, GenerationConfig(max_new_tokens=6))]
    again = [r.answers for r in generate(model, PROMPTS, TOKENS, GenerationConfig(max_new_tokens=6, use_cache=False))]
    assert cached == again
    assert any(len(a) > 1 for ans in cached for a in ans)
