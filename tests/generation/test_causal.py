"""Causal continuation (GLM-4's prompt format, ``tools/generate.py --causal``): the KV cache, a padded batch and a
plain argmax loop over full causal forwards give the same tokens; stop tokens end a row."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.errors import GLMError
from megatron_glm.generation import GenerationConfig
from megatron_glm.generation.causal import continue_causal
from megatron_glm.model import GLMModel, load_full_state_dict
from tests.model.helpers import random_full_state_dict, tiny_config

torch.set_num_threads(1)
PAD = 121
#: [gMASK]<sop> then text, of different lengths.
PROMPTS = [[124, 122, 5, 6, 7, 8, 9], [124, 122, 11], [124, 122, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.fixture(scope="module")
def model() -> GLMModel:
    """A tiny GLM-4-shaped model: rotary on half of each head (interleaved), GQA, SwiGLU, RMSNorm."""
    cfg = tiny_config(
        position_embedding_type="rope", rotary_percent=0.5, rotary_interleaved=True, activation="swiglu",
        normalization="RMSNorm", num_query_groups=2, add_bias_linear=False, max_sequence_length=64,
    )  # fmt: skip
    model = GLMModel(cfg, seed=0)
    load_full_state_dict(model, random_full_state_dict(model, 5))
    return model.eval()


def reference(model: GLMModel, prompt: list[int], steps: int, stops: tuple[int, ...] = ()) -> list[int]:
    """Argmax of full causal forwards (sep 0: causal; positions 0..n-1), one token at a time."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            n = len(ids)
            pos = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)]).unsqueeze(0)
            token = int(model(torch.tensor([ids]), pos, torch.zeros(1, dtype=torch.long))[0, -1].argmax())
            if token in stops:
                break
            ids.append(token)
    return ids[len(prompt) :]


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_continuation_equals_full_causal_forwards(model: GLMModel, use_cache: bool) -> None:
    config = GenerationConfig(max_new_tokens=8, use_cache=use_cache)
    results = continue_causal(model, PROMPTS, PAD, [], config)
    for prompt, result in zip(PROMPTS, results):
        assert result.blanks == [len(prompt)] and result.filled() == prompt
        assert result.answers[0] == reference(model, prompt, 8)
    assert len(set(map(tuple, (r.answers[0] for r in results)))) > 1


def test_a_stop_token_ends_its_row_only(model: GLMModel) -> None:
    free = continue_causal(model, PROMPTS, PAD, [], GenerationConfig(max_new_tokens=8))
    stop = free[0].answers[0][3]
    results = continue_causal(model, PROMPTS, PAD, [stop], GenerationConfig(max_new_tokens=8))
    for prompt, result in zip(PROMPTS, results):
        assert result.answers[0] == reference(model, prompt, 8, (stop,))
    assert len(results[0].answers[0]) == free[0].answers[0].index(stop)


def test_bad_causal_requests_are_one_line_errors(model: GLMModel) -> None:
    with pytest.raises(GLMError, match="no beam search"):
        continue_causal(model, PROMPTS, PAD, [], GenerationConfig(strategy="beam", num_beams=2))
    with pytest.raises(GLMError, match=r"prompt 0 has 1 tokens: a causal prompt needs at least 2"):
        continue_causal(model, [[124]], PAD, [], GenerationConfig())
    with pytest.raises(GLMError, match="at most 64 positions"):
        continue_causal(model, [[124, 122] * 30], PAD, [], GenerationConfig(max_new_tokens=8))
