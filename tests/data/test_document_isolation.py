"""Document isolation (``data.objective.reset_attention_mask``): every sample token's document, and the mask."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_glm.config import ObjectiveConfig
from megatron_glm.data.blank_infilling import DOCUMENT, SENTENCE, TOKEN, BlankInfilling, ObjectiveChoice
from megatron_glm.data.loader import collate
from megatron_glm.model import batch_attention_mask, sep_to_mask
from tests.data.test_blank_infilling import SP

WIDTH = 30  # document k's ordinary tokens are k*WIDTH .. k*WIDTH+WIDTH-1, so a token names its document


def packed_window(rng: np.random.Generator, length: int, docs: int = 3) -> np.ndarray:
    """[CLS] + ``docs`` documents of random lengths, each closed by [eos] (the last one maybe cut)."""
    cuts = np.sort(rng.choice(np.arange(3, length - 2), docs - 1, replace=False))
    doc = np.searchsorted(cuts, np.arange(1, length), side="right")
    text = doc * WIDTH + rng.integers(0, WIDTH, length - 1)
    text[cuts - 1] = SP.eos  # window position cut (text index cut - 1) closes the document before it
    return np.concatenate(([SP.cls], text)).astype(np.int64)


def samples(objective: int, count: int, seq: int = 96, **cfg: object):
    bi = BlankInfilling(dataclasses.replace(ObjectiveConfig(reset_attention_mask=True), **cfg), SP, seq)
    rng = np.random.default_rng(objective)
    for i in range(count):
        length = int(rng.integers(12, seq + 1))
        window = packed_window(rng, length)
        starts = np.flatnonzero(np.isin(window, [SP.cls, SP.eos])) + 1
        yield bi.sample(window, np.random.default_rng([objective, i]), ObjectiveChoice(objective), starts)


@pytest.mark.parametrize("objective", [TOKEN, SENTENCE, DOCUMENT])
def test_every_token_carries_its_document(objective: int) -> None:
    ordinary_checked = eos_checked = 0
    for s in samples(objective, 400):
        doc, inp, lab, pos = s["doc_ids"], s["input_ids"], s["labels"], s["position_ids"]
        sep, end_b = s["sep"], s["sep"] + int(s["loss_mask"].sum())
        assert doc[0] == 0  # [CLS]
        assert np.all(doc[end_b:] == -1) and np.all(doc[:end_b] >= 0)  # padding is a document of its own
        # Part A: the original tokens (labels row) name their document; a document's tokens stay in order.
        a = lab[:sep]
        plain = a < 3 * WIDTH
        assert np.array_equal(doc[:sep][plain], a[plain] // WIDTH)
        assert np.all(np.diff(doc[:sep]) >= 0)
        # Part B: an input token is in its own document; [sop] is in the document of its span's blank.
        b = slice(sep, end_b)
        plain_b = inp[b] < 3 * WIDTH
        assert np.array_equal(doc[b][plain_b], inp[b][plain_b] // WIDTH)
        sop = np.flatnonzero(inp[b] == SP.sop) + sep
        assert np.array_equal(doc[sop], doc[pos[0, sop]])
        # [eos] belongs to the document it closes (Megatron's convention), in Part A and as a Part B input.
        eos = np.flatnonzero(inp[:end_b] == SP.eos)
        eos = eos[(eos > 0) & (eos != sep)]
        eos = eos[inp[eos - 1] != SP.eos]  # two [eos] in a row close an empty document
        assert np.array_equal(doc[eos], doc[eos - 1])
        eos_checked += len(eos)
        ordinary_checked += int(plain.sum() + plain_b.sum())
    assert ordinary_checked > 10_000 and eos_checked > 100


def test_without_the_flag_samples_have_no_doc_ids() -> None:
    bi = BlankInfilling(ObjectiveConfig(), SP, 64)
    window = packed_window(np.random.default_rng(0), 64)
    sample = bi.sample(window, np.random.default_rng(1), ObjectiveChoice(TOKEN))
    assert "doc_ids" not in sample and "doc_ids" not in collate([sample])


def test_batch_mask_is_the_glm_mask_within_each_document() -> None:
    batch = collate(list(samples(DOCUMENT, 3, seq=48)))
    mask = batch_attention_mask(batch).bool_mask  # evaluated from the per-token doc_ids where a kernel needs it
    doc, sep = batch["doc_ids"], batch["sep"]
    assert mask.shape == (3, 1, 48, 48) and mask.dtype == torch.bool
    glm = sep_to_mask(sep, 48)
    for n in range(3):
        for i in range(48):
            for j in range(48):
                assert bool(mask[n, 0, i, j]) == (bool(glm[n, 0, i, j]) and int(doc[n, i]) == int(doc[n, j]))
    assert not torch.equal(mask, glm)  # these windows hold several documents
    assert bool(mask[:, 0].diagonal(dim1=1, dim2=2).all())  # every token sees itself: no empty softmax row
    assert torch.equal(batch_attention_mask({k: v for k, v in batch.items() if k != "doc_ids"}), sep)
