"""Cloze scoring equals a brute-force reference (one forward per choice); perplexity windows; generation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_glm.finetune.config import FinetuneConfig
from megatron_glm.finetune.encode import (
    ROW_ANSWER,
    ROW_TASK,
    TaskDataset,
    TaskEncoder,
    collate_rows,
    empty_row,
    glm_row,
    stack_rows,
)
from megatron_glm.finetune.evaluate import (
    evaluate_rows,
    generate_targets,
    generation_config,
    perplexity,
    perplexity_windows,
)
from megatron_glm.finetune.loss import TaskLoss
from megatron_glm.finetune.tasks import Seq2SeqExample
from megatron_glm.generation import GenerationConfig, generate
from megatron_glm.generation.sampling import repeated_ngram_tokens
from megatron_glm.parallel import ParallelState
from tests.finetune.helpers import WordTokenizer
from tests.generation.helpers import MASK, TOKENS, full_weights, tiny_model


def _examples(seed: int, n: int) -> list[tuple[list[int], int, list[list[int]], int]]:
    """(Part A, blank position, choices, label) with different lengths and choice counts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        left, right = rng.randint(0, 6), rng.randint(0, 4)
        part_a = [TOKENS.cls, *rng.choices(range(100), k=left), MASK, *rng.choices(range(100), k=right)]
        choices = [rng.choices(range(100), k=rng.randint(1, 4)) for _ in range(rng.randint(2, 4))]
        out.append((part_a, 1 + left, choices, rng.randrange(len(choices))))
    return out


def _brute_force(model: torch.nn.Module, part_a: list[int], blank: int, choice: list[int], mean: bool) -> float:
    """log p(choice | Part A) from one forward of exactly [Part A, sop, choice[:-1]] (no padding)."""
    with torch.no_grad():
        return _brute(model, part_a, blank, choice, mean)


def _brute(model: torch.nn.Module, part_a: list[int], blank: int, choice: list[int], mean: bool) -> float:
    n, k = len(part_a), len(choice)
    ids = torch.tensor([[*part_a, TOKENS.sop, *choice[:-1]]])
    pos = torch.zeros(1, 2, n + k, dtype=torch.long)
    pos[0, 0, :n] = torch.arange(n)
    pos[0, 0, n:] = blank
    pos[0, 1, n:] = torch.arange(1, k + 1)
    logp = torch.log_softmax(model(ids, pos, torch.tensor([n])).double(), dim=-1)[0, n - 1 + torch.arange(k) + 1]
    total = float(logp[torch.arange(k), torch.tensor(choice)].sum())
    return total / k if mean else total


@pytest.mark.parametrize("scoring", ["sum", "mean"])
def test_cloze_scores_equal_one_forward_per_choice(scoring: str) -> None:
    model = tiny_model()
    examples = _examples(0, 5)
    length, width = 16, 4
    rows = []
    for part_a, blank, choices, label in examples:
        r = [
            glm_row(
                part_a,
                blank,
                c,
                start=TOKENS.sop,
                length=length,
                pad=TOKENS.pad,
                objective=ROW_ANSWER if j == label else ROW_TASK,
            )
            for j, c in enumerate(choices)
        ]
        rows.append(stack_rows(r + [empty_row(length, TOKENS.pad)] * (width - len(r))))
    batch = collate_rows(rows)
    loss = TaskLoss("cloze", ParallelState(), num_choices=width, scoring=scoring)
    out = loss.forward(model, batch)
    got = loss.last_scores
    ref = torch.full((len(examples), width), -1e4, dtype=torch.float64)
    for i, (part_a, blank, choices, _) in enumerate(examples):
        for j, c in enumerate(choices):
            ref[i, j] = _brute_force(model, part_a, blank, c, scoring == "mean")
    assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0), (got, ref)
    labels = torch.tensor([e[3] for e in examples])
    expected = torch.nn.functional.cross_entropy(ref, labels)
    assert abs(float(out.loss) - float(expected)) < 1e-5
    # evaluate_rows counts exactly the brute-force argmax predictions (two examples per micro-batch, padded)
    ds = TaskDataset(rows, rows_per_example=width, seq_length=length, pad=TOKENS.pad, shuffle=False)
    confusion, _, count = evaluate_rows(model, ds, loss, micro_batch_size=2)
    assert count == len(examples)
    expected_confusion = torch.zeros(width, width, dtype=torch.float64)
    for t, p in zip(labels.tolist(), ref.argmax(dim=1).tolist()):
        expected_confusion[t, p] += 1
    assert torch.equal(confusion, expected_confusion)


def test_cloze_loss_trains_towards_the_label() -> None:
    """A few SGD steps on the choice cross entropy raise the labelled choice's share."""
    torch.manual_seed(0)
    model = tiny_model().train()
    examples = _examples(1, 4)
    rows = [
        stack_rows(
            [
                glm_row(
                    a, b, c, start=TOKENS.sop, length=16, pad=TOKENS.pad, objective=ROW_ANSWER if j == lab else ROW_TASK
                )
                for j, c in enumerate(ch)
            ]
            + [empty_row(16, TOKENS.pad)] * (4 - len(ch))
        )
        for a, b, ch, lab in examples
    ]
    batch = collate_rows(rows)
    loss = TaskLoss("cloze", ParallelState(), num_choices=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = None
    for _ in range(5):
        out = loss.forward(model, batch)
        first = first if first is not None else float(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(loss.forward(model, batch).loss) < first - 0.1


@pytest.mark.parametrize(("n", "window", "overlap"), [(1, 8, 2), (37, 8, 0), (37, 8, 4), (100, 16, 12), (16, 16, 3)])
def test_perplexity_windows_score_every_token_once(n: int, window: int, overlap: int) -> None:
    covered = []
    for c0, c1, e in perplexity_windows(n, window, overlap):
        assert c1 - c0 == min(overlap, c1) and 2 + (c1 - c0) + (e - c1) <= window and e > c1
        covered += range(c1, e)
    assert covered == list(range(n))


def test_perplexity_equals_per_window_reference() -> None:
    model = tiny_model()
    tok = WordTokenizer()
    rng = random.Random(2)
    ids = rng.choices(range(100), k=29)
    got = perplexity(model, tok, ids, words=10, window=12, overlap=3, batch_size=2)
    nll = 0.0
    for c0, c1, e in perplexity_windows(len(ids), 12, 3):
        part_a = [tok.cls_id, *ids[c0:c1], tok.gmask_id]
        nll -= _brute_force(model, part_a, len(part_a) - 1, ids[c1:e], mean=False)
    assert got["tokens"] == 29 and abs(got["nll"] - nll) < 1e-4
    assert math.isclose(got["ppl_token"], math.exp(nll / 29), rel_tol=1e-5)
    assert math.isclose(got["ppl_word"], math.exp(nll / 10), rel_tol=1e-5)


def _ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def test_repeated_ngram_tokens() -> None:
    assert repeated_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert repeated_ngram_tokens([1, 2, 1, 3, 1], 2) == [2, 3]
    assert repeated_ngram_tokens([4, 4, 5], 1) == [4, 5]
    assert repeated_ngram_tokens([1, 2], 3) == [] and repeated_ngram_tokens([1, 1], 0) == []


@pytest.mark.parametrize("strategy", ["beam", "greedy"])
def test_no_repeat_ngram_never_repeats(strategy: str) -> None:
    """Property: over random prompts, weights, n and beam widths no answer holds an n-gram twice (and the
    same prompts without the option do repeat, so the check has teeth)."""
    rng = random.Random(5)
    repeats_without = 0
    for trial in range(6):
        weights_seed = 11 + trial
        model = tiny_model(full_weights(weights_seed))
        n = rng.choice([1, 2, 3])
        prompts = [[TOKENS.cls, *rng.choices(range(100), k=rng.randint(1, 8)), TOKENS.gmask] for _ in range(2)]
        beams = rng.choice([2, 3])
        banned = tuple(range(100, 128))  # unused and command ids except [eop] (answers may end early)
        for no_repeat in (n, 0):
            config = GenerationConfig(
                strategy=strategy,
                num_beams=beams if strategy == "beam" else 1,
                max_new_tokens=24,
                no_repeat_ngram_size=no_repeat,
                banned_ids=tuple(t for t in banned if t != TOKENS.eop),
            )
            for result in generate(model, prompts, TOKENS, config):
                answer = result.answers[0]
                grams = _ngrams(answer, n)
                if no_repeat:
                    assert len(grams) == len(set(grams)), (n, answer)
                else:
                    repeats_without += len(grams) != len(set(grams))
    assert repeats_without > 0


def test_kv_cache_generation_equals_recomputation_on_seq2seq_prompts() -> None:
    model = tiny_model()
    tok = WordTokenizer()
    enc = TaskEncoder(tok, FinetuneConfig(task="seq2seq", source_length=12, target_length=10))
    rng = random.Random(3)
    examples = [
        Seq2SeqExample(" ".join(f"t{rng.randrange(50)}" for _ in range(rng.randint(2, 12))), "x", i + 1)
        for i in range(4)
    ]
    cfg = FinetuneConfig(task="seq2seq", num_beams=3, no_repeat_ngram_size=2, target_length=10, length_penalty=0.7)
    cached = generation_config(cfg, tok, 128)
    recompute = GenerationConfig(**{**cached.__dict__, "use_cache": False})
    prompts = [enc.part_a(ex.source) for ex in examples]
    a = generate(model, prompts, enc.tokens, cached)
    b = generate(model, prompts, enc.tokens, recompute)
    assert [r.answers for r in a] == [r.answers for r in b]
    assert all(abs(x.score - y.score) < 1e-4 for x, y in zip(a, b))
    assert generate_targets(model, enc, examples, cached) == [tok.decode(r.answers[0]) for r in a]
    greedy = GenerationConfig(strategy="greedy", max_new_tokens=10)
    assert [r.answers for r in generate(model, prompts, enc.tokens, greedy)] == [
        r.answers
        for r in generate(
            model, prompts, enc.tokens, GenerationConfig(strategy="greedy", max_new_tokens=10, use_cache=False)
        )
    ]


def test_classification_and_generation_metrics() -> None:
    from megatron_glm.finetune.metrics import classification_metrics, generation_metrics

    confusion = torch.tensor([[3.0, 1.0], [0.0, 2.0]])  # label x prediction
    m = classification_metrics(confusion, classes=True)
    assert m["accuracy"] == pytest.approx(5 / 6)
    f1_0, f1_1 = 2 * 3 / (2 * 3 + 1), 2 * 2 / (2 * 2 + 1)
    assert m["f1_macro"] == pytest.approx((f1_0 + f1_1) / 2)
    g = generation_metrics(["the cat sat on the mat", "a dog"], ["the cat sat on the mat", "the dog barked"])
    assert g["rouge1"] == pytest.approx(100 * (1.0 + 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)) / 2)
    assert 0 < g["bleu"] <= 100 and g["rougeL"] <= g["rouge1"] + 1e-9
