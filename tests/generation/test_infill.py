"""Blank infilling: KV cache == full recompute, GLM 2-D positions, masks, batching, strategies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_glm.errors import GLMError
from megatron_glm.generation import GenerationConfig, KVCache, Stepper, generate, infill_mask
from megatron_glm.model import sep_to_mask
from tests.generation.helpers import MASK, PROMPTS, SMASK, TOKENS, tiny_model
from tests.model.helpers import make_batch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _answers(model, prompts, **kw):
    return [r.answers for r in generate(model, prompts, TOKENS, GenerationConfig(**kw))]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cached_forward_equals_full_forward(impl: str) -> None:
    """Part A through the cache in one go, then Part B one token at a time == one forward with the sep mask."""
    model = tiny_model(attention_impl=impl)
    batch = make_batch(4, batch=1, seq=16)
    ids, pos, sep = batch["input_ids"], batch["position_ids"], batch["sep"]
    n = int(sep[0])
    with torch.no_grad():
        full = model(ids, pos, sep)
        cache = KVCache(capacity=4)  # grows while decoding
        parts = [model(ids[:, :n], pos[:, :, :n], sep, kv_cache=cache)]
        for j in range(n, ids.shape[1]):
            mask = sep_to_mask(sep, ids.shape[1])[:, :, j : j + 1, : j + 1]
            parts.append(model(ids[:, j : j + 1], pos[:, :, j : j + 1], mask, kv_cache=cache))
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="KV cache"):
        model(ids[:, :1], pos[:, :, :1], sep, kv_cache=cache)  # a sep tensor needs an empty cache


def test_infill_mask_is_the_training_mask_for_one_row() -> None:
    n, total = 6, 11
    mask = infill_mask(torch.tensor([n]), n, 0, total, total)
    assert torch.equal(mask, sep_to_mask(torch.tensor([n]), total))
    # Padded rows: real tokens never see padding; fed tokens see the real Part A and earlier fed tokens.
    mask = infill_mask(torch.tensor([3, 5]), 5, 0, 8, 8)[0, 0]
    assert not mask[:3, 3:5].any() and not mask[5:, 3:5].any()
    assert mask[5:, :3].all() and torch.equal(mask[5:, 5:], torch.ones(3, 3, dtype=torch.bool).tril())
    # Rows of the mask for queries q_start.. are the corresponding rows of the full mask.
    full = infill_mask(torch.tensor([3, 5]), 5, 0, 8, 8)
    torch.testing.assert_close(infill_mask(torch.tensor([3, 5]), 5, 6, 2, 8), full[:, :, 6:8])


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS[1:2], PROMPTS], ids=["two-blanks", "gmask", "batch"])
def test_greedy_cache_equals_recompute(model, prompts) -> None:
    cached = _answers(model, prompts, max_new_tokens=8)
    assert cached == _answers(model, prompts, max_new_tokens=8, use_cache=False)
    assert any(len(a) > 1 for ans in cached for a in ans)  # not trivially empty


def test_sampling_and_beam_cache_equal_recompute(model) -> None:
    for kw in (
        dict(strategy="sample", temperature=0.9, top_k=30, top_p=0.95, seed=3),
        dict(strategy="beam", num_beams=3),
    ):
        cached = generate(model, PROMPTS, TOKENS, GenerationConfig(max_new_tokens=6, **kw))
        full = generate(model, PROMPTS, TOKENS, GenerationConfig(max_new_tokens=6, use_cache=False, **kw))
        assert [r.answers for r in cached] == [r.answers for r in full], kw
        again = generate(model, PROMPTS, TOKENS, GenerationConfig(max_new_tokens=6, **kw))
        assert [r.answers for r in again] == [r.answers for r in cached]  # deterministic
    beams = generate(model, PROMPTS, TOKENS, GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=6))
    assert all(r.score is not None and r.score <= 0 for r in beams)


def test_batched_prompts_equal_one_at_a_time(model) -> None:
    assert _answers(model, PROMPTS, max_new_tokens=8) == [_answers(model, [p], max_new_tokens=8)[0] for p in PROMPTS]


def test_positions_blocks_and_left_to_right_order(model) -> None:
    """Fed tokens: [sop] answer1 [sop] answer2 ..., each span at its blank's position with block positions
    1, 2, ...; the [eop]s are not fed (as in training)."""
    prompt = PROMPTS[0]
    (result,) = generate(model, [prompt], TOKENS, GenerationConfig(max_new_tokens=5))
    assert result.blanks == [3, 7] and prompt[3] == MASK and prompt[7] == SMASK
    stepper = Stepper(model, [prompt], TOKENS.pad, use_cache=True)
    expect_ids, expect_pos, expect_block = [], [], []
    for blank, answer in zip(result.blanks, result.answers):
        expect_ids += [TOKENS.sop, *answer]
        expect_pos += [blank] * (len(answer) + 1)
        expect_block += list(range(1, len(answer) + 2))
    for t, p, b in zip(expect_ids, expect_pos, expect_block):
        stepper.step(torch.tensor([t]), torch.tensor([p]), torch.tensor([b]))
    # Generation fed exactly this sequence (the last answer token of the last blank is fed, then [eop] out).
    assert result.extra["steps"] == len(expect_ids)
    # Recomputing that sequence in one forward with the training (sep) mask reproduces every choice.
    ids = torch.tensor([prompt + expect_ids])
    pos = torch.tensor([[list(range(len(prompt))) + expect_pos, [0] * len(prompt) + expect_block]])
    with torch.no_grad():
        greedy = model(ids, pos, torch.tensor([len(prompt)]))[0, len(prompt) :].argmax(-1).tolist()
    start = 0
    for answer in result.answers:  # after [sop] a1..ak the model chose a1..ak, then [eop] (forced at 5 tokens)
        chosen = greedy[start : start + len(answer) + 1]
        assert chosen[:-1] == answer and (chosen[-1] == TOKENS.eop or len(answer) == 5)
        start += len(answer) + 1
    n1 = len(result.answers[0])
    # The second blank sees the first answer: changing it changes the second blank's logits.
    with torch.no_grad():
        other = ids.clone()
        other[0, len(prompt) + 1] = (other[0, len(prompt) + 1] + 1) % 100
        a = model(ids, pos, torch.tensor([len(prompt)]))[0, len(prompt) + n1 + 1]
        b = model(other, pos, torch.tensor([len(prompt)]))[0, len(prompt) + n1 + 1]
    assert (a - b).abs().max() > 1e-4


def test_max_new_tokens_forces_eop_and_banned_ids(model) -> None:
    config = GenerationConfig(max_new_tokens=4, banned_ids=(TOKENS.eop, 7))
    for result in generate(model, PROMPTS, TOKENS, config):
        assert [len(a) for a in result.answers] == [4] * len(result.blanks)
        assert all(7 not in a for a in result.answers)


def test_user_errors(model) -> None:
    with pytest.raises(GLMError, match="no blank"):
        generate(model, [[120, 1, 2]], TOKENS, GenerationConfig())
    with pytest.raises(GLMError, match="positions"):
        generate(model, PROMPTS, TOKENS, GenerationConfig(max_new_tokens=1000))
    with pytest.raises(GLMError, match="top_p"):
        GenerationConfig(strategy="sample", top_p=0.0)
    with pytest.raises(GLMError, match="num_beams"):
        GenerationConfig(strategy="beam", num_beams=1)


def test_training_mode_is_restored(model) -> None:
    model.train()
    generate(model, PROMPTS[:1], TOKENS, GenerationConfig(max_new_tokens=2))
    assert model.training
    model.eval()


def test_kv_cache_reorder_and_growth() -> None:
    cache = KVCache(capacity=2)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    out_k, _ = cache.layer(0).update(k, -k)
    assert torch.equal(out_k, k) and cache.length == 3
    cache.reorder(torch.tensor([1, 1, 0]))
    out_k, out_v = cache.layer(0).update(torch.zeros(3, 1, 1, 2), torch.zeros(3, 1, 1, 2))
    assert out_k.shape == (3, 1, 4, 2) and torch.equal(out_k[0, :, :3], k[1]) and torch.equal(out_v[2, :, :3], -k[0])


def test_bf16_cache_runs(model) -> None:
    half = tiny_model().to(torch.bfloat16)
    out = generate(half, PROMPTS, TOKENS, GenerationConfig(max_new_tokens=3))
    assert len(out) == 3 and all(len(r.answers) == len(r.blanks) for r in out)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        GenerationConfig().max_new_tokens = 3  # type: ignore[misc]
