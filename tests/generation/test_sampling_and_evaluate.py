"""Logit filters and sampling; validation loss per objective; cloze accuracy against greedy generation."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_glm.generation import GenerationConfig, filter_logits, generate, next_tokens
from megatron_glm.generation.evaluate import ClozeExample, cloze_accuracy, evaluate_loss
from megatron_glm.model import glm_loss
from tests.generation.helpers import MASK, TOKENS, tiny_model
from tests.model.helpers import make_batch

torch.set_num_threads(1)


def test_filters_keep_top_k_and_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).sum() == 1  # the best token always survives
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)


def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    sample = GenerationConfig(strategy="sample", temperature=1.5)
    a = next_tokens(logits, sample, torch.Generator().manual_seed(1))
    b = next_tokens(logits, sample, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = next_tokens(logits, GenerationConfig(), None)
    one = GenerationConfig(strategy="sample", top_k=1)
    assert torch.equal(next_tokens(logits, one, torch.Generator().manual_seed(2)), greedy)


def test_evaluate_loss_matches_glm_loss_per_objective() -> None:
    model = tiny_model()
    batches = [make_batch(s) for s in (1, 2)]
    for i, b in enumerate(batches):
        b["objective"] = torch.tensor([0, 1, 0]) if i == 0 else torch.tensor([2, 2, 0])
    out = evaluate_loss(model, iter(batches), num_batches=5)
    sums, counts = {}, {}
    with torch.no_grad():
        for b in batches:
            loss = glm_loss(model(b["input_ids"], b["position_ids"], b["sep"]), b["labels"], b["loss_mask"])
            for k, (s, n) in loss.by_group(b["objective"]).items():
                sums[k], counts[k] = sums.get(k, 0.0) + s, counts.get(k, 0.0) + n
    total = sum(sums.values()) / sum(counts.values())
    assert out["loss"] == pytest.approx(total, rel=1e-6) and out["ppl"] == pytest.approx(math.exp(total), rel=1e-6)
    for k, name in enumerate(("token", "sentence", "document")):
        assert out[f"loss_{name}"] == pytest.approx(sums[k] / counts[k], rel=1e-6)


class WordTokenizer:
    """``w0 .. w99`` are tokens 0..99; command tokens as in the test vocabulary."""

    cls_id, pad_id, sop_id, eop_id = TOKENS.cls, TOKENS.pad, TOKENS.sop, TOKENS.eop

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def token_to_id(self, token: str) -> int:
        return {"[MASK]": MASK, "[gMASK]": TOKENS.gmask}[token]


def test_cloze_accuracy_agrees_with_greedy_generation() -> None:
    model = tiny_model()
    contexts = [[3, 4, 5, 6], [10, 11], [20, 21, 22, 23, 24, 25, 26]]
    prompts = [[TOKENS.cls, *c, MASK] for c in contexts]
    answers = [r.answers[0] for r in generate(model, prompts, TOKENS, GenerationConfig(max_new_tokens=3))]
    words = lambda ids: " ".join(f"w{i}" for i in ids)
    right = [ClozeExample(words(c), words(a[:2])) for c, a in zip(contexts, answers)]
    wrong = [ClozeExample(words(c), words([(a[0] + 1) % 100])) for c, a in zip(contexts, answers)]
    tok = WordTokenizer()
    assert cloze_accuracy(model, tok, right, batch_size=2) == {"accuracy": 1.0, "token_accuracy": 1.0, "count": 3.0}
    assert cloze_accuracy(model, tok, wrong)["accuracy"] == 0.0
