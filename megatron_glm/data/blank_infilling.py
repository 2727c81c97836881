"""GLM's autoregressive blank-infilling objectives, vectorised with numpy.

Given a window of tokens (``[CLS]`` first, documents separated by ``[eos]``), an objective chooses
spans and lays out one sample of exactly ``seq_length`` tokens:

- **Part A**: the window with each span replaced by one mask token, original order kept;
- **Part B**: the spans (shuffled unless ``shuffle_block`` is off), each as input ``[sop] x_a..x_b``
  with targets ``x_a..x_b [eop]``;
- ``position_ids[0]``: positions in Part A; every token of a Part B span has its mask's position;
- ``position_ids[1]``: block positions, 0 in Part A and ``1..k+1`` in a span of length ``k``
  (all 1 in Part B with ``block_position`` off, as the original);
- ``loss_mask`` is 1 exactly on Part B; ``sep`` is the length of Part A; the rest is padding
  (``[pad]``, position 0, loss 0).

A sample never grows past ``seq_length``: each span adds two tokens (its mask and ``[sop]``), so the
window is cut to ``seq_length - 2 * spans`` tokens (Part A shortened) before the spans are laid
out. ``[CLS]`` and ``[eos]`` are never inside a span (except that a document-level suffix may run
over document ends: it is language modelling across the packed documents).

Objectives (the original flag names live in :class:`~megatron_glm.config.ObjectiveConfig`):

- **token** (``[MASK]``): span lengths from Poisson(``avg_block_length``) truncated to
  ``1..max_block_length``, drawn until ``mask_ratio`` of the window is covered, placed uniformly
  with at least one unmasked token between spans (spread over the documents of a packed window in
  proportion to their lengths);
- **sentence** (``[sMASK]``): whole sentences in random order until ``gap_sentence_ratio`` of the
  window is covered;
- **document** (``[gMASK]``): one span of ``gpt_min_ratio``..100% of the window's text; a suffix
  with probability ``gpt_infill_prob`` (the original's naming) or when several documents are
  packed in the window, else placed uniformly inside the document.

Every random choice comes from the ``numpy.random.Generator`` passed in, so a sample is a pure
function of (window, generator state). The mixture draw lives in :mod:`~megatron_glm.data.objective_choice`,
span placement in :mod:`~megatron_glm.data.blank_spans`; :mod:`~megatron_glm.data.objectives` puts these
objectives and GLM-4's causal one (:mod:`~megatron_glm.data.causal`) behind one sampler.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from megatron_glm.batch import OBJECTIVE_NAMES
from megatron_glm.config.sections import ObjectiveConfig
from megatron_glm.data.blank_spans import fit_spans, place_many, truncated_poisson_pmf
from megatron_glm.data.char_boundaries import CharBoundaries
from megatron_glm.data.objective_choice import DOCUMENT, SENTENCE, TOKEN, ObjectiveChoice
from megatron_glm.tokens import CommandTokens

__all__ = [
    "DOCUMENT",
    "OBJECTIVE_NAMES",
    "SENTENCE",
    "TOKEN",
    "BlankInfilling",
    "ObjectiveChoice",
    "SpecialTokens",
    "truncated_poisson_pmf",
]

#: Context masking (``context_mask_ratio``) picks Part A tokens within this distance of a blank.
CONTEXT_MASK_RANGE = 3

_EMPTY = np.zeros(0, dtype=np.int64)


SpecialTokens = CommandTokens
"""The command-token ids the objectives need (the package-wide bundle)."""


class BlankInfilling:
    """Builds fixed-length GLM samples from token windows.

    ``objective`` holds the mixture flags, ``special`` the command-token ids and ``seq_length`` the
    length of every sample. Call :meth:`sample` per sample with the sample's own generator and the
    :class:`ObjectiveChoice` of its micro-batch (:func:`~megatron_glm.data.objective_choice.choose_objective`;
    :class:`~megatron_glm.data.objectives.Objectives` does both, for every objective).
    """

    def __init__(
        self, objective: ObjectiveConfig, special: SpecialTokens, seq_length: int, chars: CharBoundaries | None = None
    ) -> None:
        if seq_length < 8:
            raise ValueError(f"seq_length must be at least 8, got {seq_length}")
        self.cfg = objective
        self.special = special
        self.chars = chars
        """Byte-fallback character boundaries (:mod:`~megatron_glm.data.char_boundaries`): spans cover whole
        characters; None: the tokenizer spells no character in bytes."""
        self.seq_length = int(seq_length)
        self._cdf = np.cumsum(truncated_poisson_pmf(objective.avg_block_length, objective.max_block_length))
        self._cdf[-1] = 1.0
        self._mean_span = float(
            np.dot(
                np.arange(1, objective.max_block_length + 1),
                truncated_poisson_pmf(objective.avg_block_length, objective.max_block_length),
            )
        )
        # Spans to draw at once: enough for a full window almost always (more are drawn if not).
        self._pool = int(objective.mask_ratio * seq_length / self._mean_span * 1.5) + 8
        self._mask_of = {
            TOKEN: special.mask,
            SENTENCE: special.smask if objective.task_mask else special.mask,
            DOCUMENT: special.gmask if objective.task_mask else special.mask,
        }
        self._barrier_ids = tuple(i for i in (special.cls, special.eos, special.pad) if i >= 0)
        # Barrier lookup: ids past the table clip to its last entry, which is False.
        self._barrier_lut = np.zeros(max(self._barrier_ids) + 2, dtype=bool)
        self._barrier_lut[list(self._barrier_ids)] = True
        self._arange = np.arange(seq_length + 1, dtype=np.int64)
        self._arange1 = self._arange + 1
        self._zero_one = np.array([0, 1], dtype=np.int64)
        self._template = np.zeros((4, seq_length), dtype=np.int64)
        self._template[:2] = special.pad
        # Spans to draw beyond the pool (placement and shuffle numbers per span).
        self._spare = self._pool
        counts = np.arange(1, self._pool + 1)
        self._full_targets = np.maximum(1, (objective.mask_ratio * (seq_length - 2 * counts)).astype(np.int64))

    def sample(
        self,
        tokens: np.ndarray,
        rng: np.random.Generator,
        choice: ObjectiveChoice,
        sentence_starts: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """One sample from ``tokens`` (int64 window, at most ``seq_length`` long).

        ``sentence_starts`` are window positions where a sentence begins (needed by the sentence
        objective; without them every document is one sentence).
        """
        tokens = tokens[: self.seq_length]
        if choice.short_seq and len(tokens) > 2:
            low = min(32, len(tokens) - 1)
            tokens = tokens[: low + int(rng.random() * (len(tokens) - low))]
        if self.chars is not None and len(tokens) > 1:  # a window cut inside a character drops the orphan bytes
            first, k = self.chars.orphans(tokens, self.special.cls)
            if k:
                tokens = np.concatenate((tokens[:first], tokens[first + k :]))
                sentence_starts = None if sentence_starts is None else sentence_starts[sentence_starts >= first + k] - k
        if choice.objective == TOKEN:
            return self.token(tokens, rng, single_span=choice.single_span)
        if choice.objective == SENTENCE:
            return self.sentence(tokens, rng, sentence_starts)
        if choice.objective == DOCUMENT:
            return self.document(tokens, rng)
        raise ValueError(f"objective {choice.objective} is not a blank-infilling objective")

    # -- objectives ----------------------------------------------------------------------------------

    def _draw_lengths(self, u: np.ndarray) -> np.ndarray:
        return self._cdf.searchsorted(u, side="right") + 1

    def _segments(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Starts and lengths of the maximal runs of maskable tokens (no [CLS]/[eos]/[pad])."""
        barrier = self._barrier_lut.take(tokens, mode="clip").nonzero()[0]
        n = len(tokens)
        if len(barrier) == 1 and barrier[0] == 0 and n > 1:  # the usual window: [CLS] + one text
            return self._zero_one[1:], np.array([n - 1], dtype=np.int64)
        if len(barrier) == 0 and n:
            return self._zero_one[:1], np.array([n], dtype=np.int64)
        starts = np.concatenate((self._zero_one[:1], barrier + 1))
        ends = np.concatenate((barrier, [n]))
        lengths = ends - starts
        keep = lengths > 0
        return starts[keep], lengths[keep]

    def token(self, tokens: np.ndarray, rng: np.random.Generator, single_span: bool = False) -> dict[str, Any]:
        """Token-level infilling: Poisson span lengths until ``mask_ratio`` is covered."""
        L = self.seq_length
        n_win = len(tokens)
        pool = self._pool
        u = rng.random(pool + 2 * self._spare)
        if single_span:
            lens = self._draw_lengths(u[:1])
        else:
            lens = self._draw_lengths(u[:pool])
            while True:
                if n_win == L and len(lens) == pool:
                    targets = self._full_targets
                else:
                    counts = np.arange(1, len(lens) + 1)
                    targets = np.maximum(1, (self.cfg.mask_ratio * np.minimum(n_win, L - 2 * counts)).astype(np.int64))
                done = lens.cumsum() >= targets
                m = int(done.argmax())
                if done[m]:
                    lens = lens[: m + 1]
                    break
                lens = np.concatenate((lens, self._draw_lengths(rng.random(pool))))
        m = len(lens)
        spare = u[pool:] if 2 * m <= len(u) - pool else rng.random(2 * m)
        n = min(n_win, L - 2 * m)
        seg_starts, seg_lens = self._segments(tokens[:n])
        starts, lens = self._place(lens, seg_starts, seg_lens, spare[:m])
        return self._assemble(tokens, starts, lens, TOKEN, rng, spare[m:])

    def _place(
        self, lens: np.ndarray, seg_starts: np.ndarray, seg_lens: np.ndarray, u: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Place spans of ``lens`` inside the segments, at least one unmasked token apart.

        ``u`` holds one uniform number per span (its place among the unmasked tokens).
        """
        if len(seg_lens) == 0 or len(lens) == 0:
            return _EMPTY, _EMPTY
        if len(seg_lens) == 1:
            seg_len = int(seg_lens[0])
            lens = fit_spans(lens, seg_len)
            m = len(lens)
            unmasked = seg_len - int(lens.sum())
            # Gap g_i = unmasked tokens before span i: sorted draws + i, strictly increasing in 0..unmasked.
            places = (u[:m] * (unmasked - m + 2)).astype(np.int64)
            places.sort()
            return places + (int(seg_starts[0]) - lens) + lens.cumsum() + self._arange[:m], lens
        return place_many(lens.tolist(), seg_starts.tolist(), seg_lens.tolist(), u.tolist())

    def sentence(
        self, tokens: np.ndarray, rng: np.random.Generator, sentence_starts: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Sentence-level infilling: whole sentences in random order until the ratio is covered."""
        L = self.seq_length
        n_win = len(tokens)
        seg_starts, seg_lens = self._segments(tokens)
        cuts = seg_starts
        if sentence_starts is not None and len(sentence_starts):
            cuts = np.concatenate((seg_starts, sentence_starts))
            cuts.sort()
            distinct = np.ones(len(cuts), dtype=bool)
            distinct[1:] = cuts[1:] != cuts[:-1]
            cuts = cuts[distinct]
        # A sentence runs from a cut to the next cut or the end of its segment.
        seg_ends = seg_starts + seg_lens
        seg_of_cut = seg_starts.searchsorted(cuts, side="right") - 1
        valid = (seg_of_cut >= 0) & (cuts < seg_ends[np.maximum(seg_of_cut, 0)])
        cuts, seg_of_cut = cuts[valid], seg_of_cut[valid]
        ends = np.empty(len(cuts), dtype=np.int64)
        if len(cuts):
            ends[:-1] = cuts[1:]
            ends[-1] = n_win
            ends = np.minimum(ends, seg_ends[seg_of_cut])
        sent_s, sent_e = cuts.tolist(), ends.tolist()
        chosen: list[int] = []
        ratio = self.cfg.gap_sentence_ratio
        for idx in rng.permutation(len(sent_s)).tolist():
            n = min(n_win, L - 2 * (len(chosen) + 1))
            if sent_s[idx] >= n:
                continue  # would be cut off with the end of Part A
            chosen.append(idx)
            if max(sent_s[i] for i in chosen) >= n:
                # One more blank shortens Part A past an earlier pick: that pick is cut off.
                chosen = [i for i in chosen if sent_s[i] < n]
                n = min(n_win, L - 2 * len(chosen))
            covered = sum(min(sent_e[i], n) - sent_s[i] for i in chosen)
            if covered >= max(1, int(ratio * n)):
                break
        chosen.sort(key=sent_s.__getitem__)
        n = min(n_win, L - 2 * len(chosen))
        starts = np.array([sent_s[i] for i in chosen], dtype=np.int64)
        lens = np.minimum(np.array([sent_e[i] for i in chosen], dtype=np.int64), n) - starts
        return self._assemble(tokens, starts, lens, SENTENCE, rng)

    def document(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Document-level infilling: one span of ``gpt_min_ratio``..100% of the text."""
        c = self.cfg
        n = min(len(tokens), self.seq_length - 2)
        first = 1 if n and tokens[0] == self.special.cls else 0
        eos_at = np.flatnonzero(tokens[first:n] == self.special.eos)
        multi_doc = len(eos_at) > 0 and (len(eos_at) > 1 or eos_at[0] != n - first - 1)
        u = rng.random(3)
        suffix = multi_doc or bool(u[0] < c.gpt_infill_prob)
        end = n
        if not suffix and len(eos_at) and tokens[n - 1] == self.special.eos:
            end = n - 1  # an infilled span stays inside the document text
        text = end - first
        if text <= 0:
            return self._assemble(tokens, _EMPTY, _EMPTY, DOCUMENT, rng)
        low = max(1, math.ceil(c.gpt_min_ratio * text - 1e-9))
        length = low + int(u[1] * (text - low + 1))
        start = end - length if suffix else first + int(u[2] * (text - length + 1))
        return self._assemble(tokens, np.array([start]), np.array([length]), DOCUMENT, rng)

    # -- layout --------------------------------------------------------------------------------------

    def _assemble(
        self,
        tokens: np.ndarray,
        starts: np.ndarray,
        lens: np.ndarray,
        objective: int,
        rng: np.random.Generator,
        keys: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Lay out Part A and Part B for spans (sorted, disjoint) of ``tokens``; pad to seq_length.

        ``keys`` (one uniform number per span, drawn from ``rng`` when not given) order Part B.
        """
        sp, c, L = self.special, self.cfg, self.seq_length
        m = len(starts)
        n = min(len(tokens), L - 2 * m)
        if self.chars is not None:
            starts, lens, n = self.chars.snap(tokens, starts, lens, n, self._barrier_lut)
            m = len(starts)
        tokens = tokens[:n]
        ends = starts + lens
        # Part A: drop every span token but the first, which becomes the mask.
        delta = np.zeros(n + 1, dtype=np.int8)
        delta[starts] = 1
        delta[ends] -= 1
        keep = delta[:n].cumsum() == 0
        keep[starts] = True
        part_a = tokens[keep]
        mask_at = starts - (lens.cumsum() - lens) + self._arange[:m]
        part_a[mask_at] = self._mask_of[objective]
        sep = len(part_a)
        # Part B: spans in random order, [sop] + span as input, span + [eop] as target.
        if c.shuffle_block and m > 1:
            order = (rng.random(m) if keys is None else keys[:m]).argsort()
            sizes, starts, mask_at = lens[order] + 1, starts[order], mask_at[order]
        else:
            sizes = lens + 1
        total_b = int(sizes.sum())
        offsets = sizes.cumsum() - sizes
        block = self._arange1[:total_b] - offsets.repeat(sizes)
        src = starts.repeat(sizes) + block - 2
        b_input = tokens.take(src, mode="clip")
        b_input[offsets] = sp.sop
        if c.reset_attention_mask:  # each output token's document: its source token's (eos closes a document)
            doc_src = np.zeros(n, dtype=np.int64)
            np.cumsum(tokens[:-1] == sp.eos, out=doc_src[1:])
            doc_b = doc_src.take(src, mode="clip")
            doc_b[offsets] = doc_src.take(starts)  # [sop]: the span's document
        src += 1
        b_target = tokens.take(src, mode="clip")
        b_target[offsets + sizes - 1] = sp.eop
        a_input = part_a
        if objective == TOKEN and m and (c.block_mask_prob > 0 or c.context_mask_ratio > 0):
            a_input = self._corrupt(part_a, b_input, offsets, mask_at, n, rng)
        end_b = sep + total_b
        out = self._template.copy()  # rows: input ids, labels (pad-filled), positions, block positions
        out[0, :sep] = a_input
        out[0, sep:end_b] = b_input
        out[1, :sep] = part_a
        out[1, sep:end_b] = b_target
        out[2, :sep] = self._arange[:sep]
        out[2, sep:end_b] = mask_at.repeat(sizes)
        out[3, sep:end_b] = block if c.block_position else 1
        loss_mask = np.zeros(L, dtype=np.float32)
        loss_mask[sep:end_b] = 1.0
        sample = {
            "input_ids": out[0],
            "labels": out[1],
            "loss_mask": loss_mask,
            "position_ids": out[2:],
            "sep": sep,
            "objective": objective,
        }
        if c.reset_attention_mask:
            doc_ids = np.full(L, -1, dtype=np.int64)  # padding: a document of its own
            doc_ids[:sep] = doc_src[keep]
            doc_ids[sep:end_b] = doc_b
            sample["doc_ids"] = doc_ids
        return sample

    def _corrupt(
        self,
        part_a: np.ndarray,
        b_input: np.ndarray,
        offsets: np.ndarray,
        mask_at: np.ndarray,
        n: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """The token objective's extra noise: ``block_mask_prob`` of the Part B inputs (never ``[sop]``, at
        ``offsets``) become [dBLOCK] in place; returns the Part A input (:meth:`_context_mask` applied)."""
        c = self.cfg
        if c.block_mask_prob > 0:
            hide = rng.random(len(b_input)) < c.block_mask_prob
            hide[offsets] = False
            b_input[hide] = self.special.dblock
        return self._context_mask(part_a, mask_at, n, rng) if c.context_mask_ratio > 0 else part_a

    def _context_mask(self, part_a: np.ndarray, mask_at: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """Replace ``context_mask_ratio`` x n Part A tokens next to blanks by [dBLOCK]."""
        sp = self.special
        sep = len(part_a)
        near = np.zeros(sep + 2 * CONTEXT_MASK_RANGE, dtype=bool)
        base = mask_at + CONTEXT_MASK_RANGE
        for d in range(1, CONTEXT_MASK_RANGE + 1):
            near[base - d] = True
            near[base + d] = True
        near = near[CONTEXT_MASK_RANGE : CONTEXT_MASK_RANGE + sep]
        near[mask_at] = False
        near &= (part_a != sp.cls) & (part_a != sp.eos)
        candidates = np.flatnonzero(near)
        count = min(len(candidates), int(self.cfg.context_mask_ratio * n))
        out = part_a.copy()
        if count:
            out[rng.choice(candidates, count, replace=False)] = sp.dblock
        return out
