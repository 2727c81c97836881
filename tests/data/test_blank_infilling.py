"""Invariant and statistical tests of the blank-infilling objectives on plain token windows."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from megatron_glm.config import ObjectiveConfig
from megatron_glm.data.blank_infilling import (
    DOCUMENT,
    SENTENCE,
    TOKEN,
    BlankInfilling,
    ObjectiveChoice,
    SpecialTokens,
    truncated_poisson_pmf,
)
from megatron_glm.data.objective_choice import choose_objective

SP = SpecialTokens(pad=100, eos=101, cls=102, mask=103, smask=104, gmask=105, sop=106, eop=107, dblock=108)
MASKS = {SP.mask, SP.smask, SP.gmask}


def make_window(rng: np.random.Generator, length: int, docs: int = 1) -> np.ndarray:
    """[CLS] + text; with ``docs`` > 1 the text holds docs - 1 [eos] separators at random places."""
    text = rng.integers(0, 100, length - 1)
    if docs > 1:
        cuts = rng.choice(np.arange(2, length - 3), docs - 1, replace=False)
        text[cuts] = SP.eos
    return np.concatenate(([SP.cls], text)).astype(np.int64)


def sentence_starts(rng: np.random.Generator, length: int) -> np.ndarray:
    """Sentence starts roughly every 5..40 tokens."""
    return np.cumsum(rng.integers(5, 40, length // 5))[: length // 5]


def spans_of(sample: dict) -> list[dict]:
    """Check the Part B layout of one sample and return its spans in Part B order."""
    inp, lab, pos = sample["input_ids"], sample["labels"], sample["position_ids"]
    sep, loss = sample["sep"], sample["loss_mask"]
    end_b = sep + int(loss.sum())
    assert np.all(loss[:sep] == 0) and np.all(loss[sep:end_b] == 1) and np.all(loss[end_b:] == 0)
    # Padding after Part B: pad tokens, position 0.
    assert np.all(inp[end_b:] == SP.pad) and np.all(lab[end_b:] == SP.pad)
    assert np.all(pos[:, end_b:] == 0)
    # Part A positions count the corrupted text; block position 0.
    assert np.array_equal(pos[0, :sep], np.arange(sep)) and np.all(pos[1, :sep] == 0)
    block = pos[1, sep:end_b]
    heads = np.flatnonzero(block == 1)
    assert len(heads) == 0 or heads[0] == 0
    spans = []
    for k, head in enumerate(heads.tolist()):
        stop = heads[k + 1] if k + 1 < len(heads) else end_b - sep
        a, b = sep + head, sep + stop
        size = b - a
        assert np.array_equal(pos[1, a:b], np.arange(1, size + 1)), "block positions run 1..k+1"
        assert np.all(pos[0, a:b] == pos[0, a]), "one position per span"
        assert inp[a] == SP.sop and lab[b - 1] == SP.eop
        assert np.array_equal(inp[a + 1 : b], lab[a : b - 1]), "targets are the next Part B tokens"
        spans.append({"at": int(pos[0, a]), "tokens": lab[a : b - 1].copy()})
    return spans


def check(sample: dict, window: np.ndarray, L: int, mask_id: int | None = None, exact: bool = True) -> list[dict]:
    """Every acceptance invariant; returns the spans with their window start added."""
    for key in ("input_ids", "labels", "loss_mask"):
        assert sample[key].shape == (L,)
    assert sample["position_ids"].shape == (2, L)
    spans = spans_of(sample)
    sep = sample["sep"]
    part_a = sample["input_ids"][:sep]
    assert np.array_equal(part_a, sample["labels"][:sep])
    blanks = np.flatnonzero(np.isin(part_a, list(MASKS)))
    assert sorted(s["at"] for s in spans) == blanks.tolist(), "one Part B span per blank"
    if mask_id is not None:
        assert np.all(part_a[blanks] == mask_id)
    by_at = {s["at"]: s for s in spans}
    pieces, cursor, origin = [], 0, 0
    for at in blanks.tolist():
        pieces.append(part_a[cursor:at])
        origin += at - cursor
        by_at[at]["start"] = origin
        pieces.append(by_at[at]["tokens"])
        origin += len(by_at[at]["tokens"])
        cursor = at + 1
    pieces.append(part_a[cursor:])
    rebuilt = np.concatenate(pieces)
    m = len(spans)
    if exact:
        assert len(rebuilt) == min(len(window), L - 2 * m), "Part A shortened exactly enough"
    assert np.array_equal(rebuilt, window[: len(rebuilt)]), "blanks filled from Part B rebuild the window"
    for s in spans:
        assert not np.isin(s["tokens"], [SP.cls, SP.pad]).any()
    if len(rebuilt) == L - 2 * m:
        assert sep + int(sample["loss_mask"].sum()) == L, "a full window leaves no padding"
    return spans


def run(
    objective: int,
    count: int,
    L: int = 128,
    cfg: ObjectiveConfig | None = None,
    docs: int = 1,
    seed: int = 0,
    short: bool = False,
    with_sentences: bool = True,
):
    cfg = cfg or ObjectiveConfig()
    bi = BlankInfilling(cfg, SP, L)
    rng = np.random.default_rng(seed)
    for i in range(count):
        length = int(rng.integers(3, L + 1)) if short else L
        window = make_window(rng, length, docs if length > 10 else 1)
        starts = sentence_starts(rng, length) if with_sentences else None
        sample = bi.sample(window, np.random.default_rng([seed, i]), ObjectiveChoice(objective), starts)
        yield window, starts, sample


MASK_OF = {TOKEN: SP.mask, SENTENCE: SP.smask, DOCUMENT: SP.gmask}


@pytest.mark.parametrize("objective", [TOKEN, SENTENCE, DOCUMENT])
@pytest.mark.parametrize("docs", [1, 3])
def test_invariants_full_windows(objective: int, docs: int) -> None:
    for window, _, sample in run(objective, 1500, docs=docs, seed=docs):
        spans = check(sample, window, 128, MASK_OF[objective])
        assert spans, "every full window gets at least one blank"
        assert sample["objective"] == objective
        if objective != DOCUMENT:
            for s in spans:
                assert SP.eos not in s["tokens"].tolist(), "[eos] is never blanked"


@pytest.mark.parametrize("objective", [TOKEN, SENTENCE, DOCUMENT])
def test_invariants_short_windows_are_padded(objective: int) -> None:
    padded = 0
    for window, _, sample in run(objective, 1500, L=64, docs=2, short=True, seed=7):
        spans = check(sample, window, 64, MASK_OF[objective])
        padded += sample["input_ids"][-1] == SP.pad
        if len(window) >= 2:
            assert spans
    assert padded > 500


@pytest.mark.parametrize("objective", [TOKEN, SENTENCE, DOCUMENT])
@pytest.mark.parametrize("L", [8, 9, 16, 513])
def test_extreme_lengths(objective: int, L: int) -> None:
    for window, _, sample in run(objective, 200, L=L, docs=2 if L > 16 else 1, seed=L):
        check(sample, window, L, MASK_OF[objective])


def test_token_spans_are_separated_and_bounded() -> None:
    cfg = ObjectiveConfig()
    for window, _, sample in run(TOKEN, 2000, docs=2, seed=3):
        spans = check(sample, window, 128)
        for s in spans:
            assert 1 <= len(s["tokens"]) <= cfg.max_block_length
        starts = sorted((s["start"], s["start"] + len(s["tokens"])) for s in spans)
        for (_, end), (start, _) in itertools.pairwise(starts):
            assert start > end, "at least one unmasked token between spans"


def test_token_masked_fraction_and_span_lengths() -> None:
    cfg = ObjectiveConfig()
    L = 512
    fractions, lengths = [], []
    for _window, _, sample in run(TOKEN, 2000, L=L, seed=11):
        spans = spans_of(sample)
        n = L - 2 * len(spans)
        masked = sum(len(s["tokens"]) for s in spans)
        assert masked >= int(cfg.mask_ratio * n)
        fractions.append(masked / n)
        lengths.extend(len(s["tokens"]) for s in spans)
    mean_fraction = float(np.mean(fractions))
    assert 0.15 <= mean_fraction < 0.16, mean_fraction
    # Wald's identity: spans drawn until a target is reached still average the truncated mean.
    pmf = [3.0**k * math.exp(-3.0) / math.factorial(k) for k in range(1, 40)]
    expected = sum(k * p for k, p in zip(range(1, 40), pmf)) / sum(pmf)
    assert expected == pytest.approx(3.0 / (1 - math.exp(-3.0)), rel=1e-9)
    lengths = np.asarray(lengths)
    assert abs(lengths.mean() - expected) < 4 * lengths.std() / math.sqrt(len(lengths)) + 0.01
    freq = np.bincount(lengths, minlength=40)[1:40] / len(lengths)
    np.testing.assert_allclose(freq[:8], truncated_poisson_pmf(3.0, 39)[:8], atol=0.01)


def test_truncated_poisson_pmf() -> None:
    pmf = truncated_poisson_pmf(3.0, 39)
    assert pmf.shape == (39,) and pmf.sum() == pytest.approx(1.0)
    assert pmf[2] / pmf[0] == pytest.approx(3.0**2 / 6)


def test_single_span() -> None:
    cfg = ObjectiveConfig(single_span_prob=1.0)
    bi = BlankInfilling(cfg, SP, 128)
    choice = choose_objective(cfg, np.random.default_rng(0))
    assert choice.single_span and choice.objective == TOKEN
    rng = np.random.default_rng(1)
    for i in range(300):
        window = make_window(rng, 128)
        spans = check(bi.sample(window, np.random.default_rng(i), choice), window, 128, SP.mask)
        assert len(spans) == 1


def test_sentence_blanks_are_whole_sentences() -> None:
    cfg = ObjectiveConfig()
    for window, starts, sample in run(SENTENCE, 2000, docs=2, seed=5):
        spans = check(sample, window, 128, SP.smask)
        n = 128 - 2 * len(spans)
        bounds = set(starts.tolist()) | set((np.flatnonzero(window == SP.eos) + 1).tolist()) | {1}
        ends = set(starts.tolist()) | set(np.flatnonzero(window == SP.eos).tolist()) | {n, len(window)}
        covered = 0
        for s in spans:
            assert s["start"] in bounds
            assert s["start"] + len(s["tokens"]) in ends
            covered += len(s["tokens"])
        assert covered >= int(cfg.gap_sentence_ratio * n)


def test_sentence_without_boundaries_uses_documents() -> None:
    for window, _, sample in run(SENTENCE, 200, docs=3, seed=9, with_sentences=False):
        spans = check(sample, window, 128, SP.smask)
        assert spans


def test_document_span_ratio_and_suffix_probability() -> None:
    cfg = ObjectiveConfig(gpt_min_ratio=0.25, gpt_infill_prob=0.3)
    suffixes = 0
    ratios = []
    count = 3000
    for window, _, sample in run(DOCUMENT, count, cfg=cfg, seed=13):
        (span,) = check(sample, window, 128, SP.gmask)
        text = 128 - 2 - 1
        is_suffix = span["start"] + len(span["tokens"]) == 126
        suffixes += is_suffix
        ratios.append(len(span["tokens"]) / text)
    ratios = np.asarray(ratios)
    assert ratios.min() >= 0.25 and ratios.max() <= 1.0
    assert abs(ratios.mean() - (0.25 + 1.0) / 2) < 0.02
    # Suffix with probability gpt_infill_prob, plus infills that happen to end at the window end.
    assert abs(suffixes / count - (0.3 + 0.7 * 0.1)) < 0.06
    for window, _, sample in run(DOCUMENT, 300, cfg=cfg, docs=3, seed=17):
        (span,) = check(sample, window, 128, SP.gmask)
        assert span["start"] + len(span["tokens"]) == 126, "packed documents always get a suffix"


def test_document_infill_excludes_final_eos() -> None:
    cfg = ObjectiveConfig(gpt_infill_prob=0.0)
    bi = BlankInfilling(cfg, SP, 64)
    rng = np.random.default_rng(0)
    for i in range(300):
        window = make_window(rng, 40)
        window[-1] = SP.eos
        (span,) = check(bi.document(window, np.random.default_rng(i)), window, 64, SP.gmask)
        assert SP.eos not in span["tokens"].tolist()


def test_objective_frequencies_follow_the_flags() -> None:
    cfg = ObjectiveConfig(bert_prob=0.5, gap_sentence_prob=0.3, single_span_prob=0.1, short_seq_prob=0.2)
    count = 20000
    choices = [choose_objective(cfg, np.random.default_rng([1, i])) for i in range(count)]
    objectives = np.bincount([c.objective for c in choices], minlength=3) / count
    single = np.mean([c.single_span for c in choices])
    short = np.mean([c.short_seq for c in choices])
    tol = 4 * math.sqrt(0.25 / count)
    assert abs(single - 0.1) < tol and abs(short - 0.2) < tol
    # Single-span batches are token batches; the rest splits by bert/gap-sentence/document.
    assert abs(objectives[TOKEN] - (0.1 + 0.9 * 0.5)) < tol
    assert abs(objectives[SENTENCE] - 0.9 * 0.3) < tol
    assert abs(objectives[DOCUMENT] - 0.9 * 0.2) < tol


def test_short_seq_cuts_the_window() -> None:
    cfg = ObjectiveConfig(short_seq_prob=1.0)
    bi = BlankInfilling(cfg, SP, 128)
    rng = np.random.default_rng(0)
    lengths = []
    for i in range(300):
        window = make_window(rng, 128)
        choice = choose_objective(cfg, np.random.default_rng(i))
        assert choice.short_seq
        sample = bi.sample(window, np.random.default_rng(i), choice)
        spans = check(sample, window, 128, exact=False)
        lengths.append(sample["sep"] + sum(len(s["tokens"]) for s in spans) - len(spans))
    assert min(lengths) >= 32 and max(lengths) < 128 and len(set(lengths)) > 30


def test_no_shuffle_keeps_text_order_and_no_block_position() -> None:
    cfg = ObjectiveConfig(shuffle_block=False, block_position=False)
    bi = BlankInfilling(cfg, SP, 128)
    rng = np.random.default_rng(0)
    for i in range(300):
        window = make_window(rng, 128)
        sample = bi.token(window, np.random.default_rng(i))
        sep, end_b = sample["sep"], sample["sep"] + int(sample["loss_mask"].sum())
        at = sample["position_ids"][0, sep:end_b]
        assert np.all(np.diff(at) >= 0), "spans in text order"
        assert np.all(sample["position_ids"][1, sep:end_b] == 1)
        assert np.all(sample["position_ids"][1, :sep] == 0)


def test_shuffled_blocks_are_shuffled() -> None:
    in_order = 0
    for _, _, sample in run(TOKEN, 100):
        sep, end_b = sample["sep"], sample["sep"] + int(sample["loss_mask"].sum())
        at = sample["position_ids"][0, sep:end_b]
        in_order += bool(np.all(np.diff(at) >= 0))
    assert in_order < 10  # about 4 spans per window: in text order with probability 1/24


def test_task_mask_off_uses_mask_everywhere() -> None:
    cfg = ObjectiveConfig(task_mask=False)
    for objective in (SENTENCE, DOCUMENT):
        for window, _, sample in run(objective, 100, cfg=cfg):
            check(sample, window, 128, SP.mask)


def test_block_mask_and_context_mask() -> None:
    cfg = ObjectiveConfig(block_mask_prob=0.5, context_mask_ratio=0.05)
    bi = BlankInfilling(cfg, SP, 256)
    rng = np.random.default_rng(0)
    hidden_b = hidden_a = total_b = 0
    for i in range(300):
        window = make_window(rng, 256)
        sample = bi.token(window, np.random.default_rng(i))
        inp, lab, sep = sample["input_ids"], sample["labels"], sample["sep"]
        end_b = sep + int(sample["loss_mask"].sum())
        # Targets are untouched: the sample without the [dBLOCK] replacements passes every check.
        clean = dict(sample, input_ids=inp.copy())
        clean["input_ids"][:sep] = lab[:sep]
        b_inp = inp[sep:end_b]
        hidden = b_inp == SP.dblock
        assert not np.any(hidden & (b_inp == SP.sop))
        shifted = np.concatenate(([SP.sop], lab[sep : end_b - 1]))
        shifted[sample["position_ids"][1, sep:end_b] == 1] = SP.sop
        clean["input_ids"][sep:end_b] = shifted
        check(clean, window, 256, SP.mask)
        hidden_b += int(hidden.sum())
        total_b += int((sample["position_ids"][1, sep:end_b] > 1).sum())
        a_hidden = np.flatnonzero(inp[:sep] == SP.dblock)
        hidden_a += len(a_hidden)
        assert len(a_hidden) <= int(0.05 * (256 - 2 * np.sum(sample["position_ids"][1] == 1)))
        blanks = np.flatnonzero(inp[:sep] == SP.mask)
        for pos in a_hidden.tolist():
            assert np.min(np.abs(blanks - pos)) <= 3, "context masks sit next to blanks"
    assert abs(hidden_b / total_b - 0.5) < 0.03
    assert hidden_a > 0


def test_choice_is_a_pure_function_of_the_generator() -> None:
    bi = BlankInfilling(ObjectiveConfig(gap_sentence_prob=0.3), SP, 128)
    window = make_window(np.random.default_rng(0), 128)
    starts = sentence_starts(np.random.default_rng(1), 128)
    for objective in (TOKEN, SENTENCE, DOCUMENT):
        a = bi.sample(window, np.random.default_rng([5, 6]), ObjectiveChoice(objective), starts)
        b = bi.sample(window, np.random.default_rng([5, 6]), ObjectiveChoice(objective), starts)
        for key in a:
            assert np.array_equal(a[key], b[key])


def test_rejects_tiny_sequences() -> None:
    with pytest.raises(ValueError):
        BlankInfilling(ObjectiveConfig(), SP, 4)


def test_special_tokens_from_tokenizer() -> None:
    class Tok:
        pass

    tok = Tok()
    for k, name in enumerate(f.name for f in dataclasses.fields(SpecialTokens)):
        setattr(tok, f"{name}_id", 200 + k)
    sp = SpecialTokens.from_tokenizer(tok)
    assert sp.pad == 200 and sp.dblock == 208
