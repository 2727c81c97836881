"""Tokenizing a preprocessing worker's records in batches (one ``encode_batch`` call per batch of records).

Each worker opens its own tokenizer (:func:`~megatron_glm.data.tokenizer.open_tokenizer`) and encodes the
texts of up to :data:`BATCH_RECORDS` records (or :data:`BATCH_CHARS` characters) at once: with a
``tokenizer.json`` that is ``tokenizers``' batch encoder; a sentencepiece model encodes text by text as
before. A text longer than :data:`PIECE_CHARS` is encoded in pieces cut at single spaces between words (bounded memory),
when probes show that gives the same ids as the whole text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from megatron_glm.data.corpus import LineProblem
from megatron_glm.data.indexed_dataset import best_dtype
from megatron_glm.data.sentence_split import split_sentences
from megatron_glm.data.tokenizer import TokenizerBase, open_tokenizer

__all__ = ["BATCH_CHARS", "BATCH_RECORDS", "PIECE_CHARS", "WorkerEncoder", "encoded_records"]

#: Characters above which a document is tokenized in pieces cut before whitespace (bounds the memory of
#: the id lists, ~36 bytes a token, for a huge document).
PIECE_CHARS = 1 << 20
#: A batch holds at most this many records, or this many characters of text.
BATCH_RECORDS = 256
BATCH_CHARS = 1 << 20

Record = tuple[list[str] | None, LineProblem | None]
Encoded = tuple[list[np.ndarray] | list[list[np.ndarray]] | None, LineProblem | None]


#: A single space between two non-space characters: a cut before it keeps every run of whitespace whole and
#: the space with the word it starts (what both sentencepiece and GLM-4's split pattern need; a cut inside a
#: run of whitespace changes how either tokenizes it).
_WORD_SPACE = re.compile(r"(?<=\S) (?=\S)")


def _cuts(text: str, piece: int) -> list[int]:
    """Positions (just before a single space between words) that cut ``text`` into pieces of about ``piece``
    characters."""
    cuts, start = [], 0
    while len(text) - start > piece:
        near = [m.start() for m in _WORD_SPACE.finditer(text, start + piece // 2, start + piece)]
        cut = near[-1] if near else -1
        if cut <= start:
            found = _WORD_SPACE.search(text, start + piece)
            if found is None:
                break
            cut = found.start()
        cuts.append(cut)
        start = cut
    return cuts


@dataclass
class WorkerEncoder:
    """A worker's tokenizer, the dtype of its ids, and whether a text may be encoded in pieces."""

    tokenizer: TokenizerBase
    dtype: np.dtype
    splittable: bool

    @classmethod
    def open(cls, tokenizer_model: str, *, single_thread: bool = False) -> WorkerEncoder:
        """``single_thread``: keep ``tokenizers`` off its own thread pool (a pool worker is one core)."""
        if single_thread:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this worker process only
        tokenizer = open_tokenizer(tokenizer_model)
        # Pieces cut at a single space between words tokenize like the whole text when the tokenizer pre-splits
        # there (sentencepiece without a dummy prefix, GLM-4's pattern); check that on probes.
        probes = ("hello world again", "a  b\nc d", "x.\ty 12 34", "x \n  y z", "be\n   returned now", "a.   b c")
        cuts = [_cuts(p, 2)[-1] for p in probes]
        heads = [p[:c] for p, c in zip(probes, cuts)]
        tails = [p[c:] for p, c in zip(probes, cuts)]
        ids = tokenizer.encode_batch([*probes, *heads, *tails])
        n = len(probes)
        splittable = all(ids[k] == ids[n + k] + ids[2 * n + k] for k in range(n))
        return cls(tokenizer, best_dtype(tokenizer.vocab_size), splittable)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text (one batch call; a huge text in pieces when that gives the same ids)."""
        spans, pieces = [], []
        for text in texts:
            bounds = [0, *_cuts(text, PIECE_CHARS), len(text)] if self.splittable else [0, len(text)]
            spans.append((len(pieces), len(pieces) + len(bounds) - 1))
            pieces.extend(text[a:b] for a, b in pairwise(bounds))
        ids: list[np.ndarray] = []
        start = chars = 0
        for end, piece in enumerate(pieces, 1):  # calls of at most ~BATCH_CHARS: bounded id lists
            chars += len(piece)
            if chars >= BATCH_CHARS or end == len(pieces):
                ids.extend(np.array(x, dtype=self.dtype) for x in self.tokenizer.encode_batch(pieces[start:end]))
                start, chars = end, 0
        del pieces
        return [ids[a] if b == a + 1 else np.concatenate(ids[a:b]) for a, b in spans]


def _encode_batch(batch: list[Record], encoder: WorkerEncoder, split: bool) -> Iterator[Encoded]:
    layout: list[list[int] | None] = []  # per record: sequences per key, or None
    texts: list[str] = []
    for record, _ in batch:
        if record is None:
            layout.append(None)
            continue
        counts = []
        for text in record:
            sequences = split_sentences(text) if split else [text]
            counts.append(len(sequences))
            texts.extend(sequences)
        layout.append(counts)
    ids = iter(encoder.encode_many(texts))
    del texts
    for (_, issue), counts in zip(batch, layout):
        if counts is None:
            yield None, issue
        elif split:
            yield [[x for x in (next(ids) for _ in range(count)) if len(x)] for count in counts], None
        else:
            yield [next(ids) for _ in counts], None


def encoded_records(records: Iterable[Record], encoder: WorkerEncoder, split: bool) -> Iterator[Encoded]:
    """``(ids per key, None)`` for each record of ``records`` (``(texts, problem)`` pairs), in order: one array
    per key, or with ``split`` a list of non-empty arrays (one per sentence) per key; ``(None, problem)``
    (``problem`` None: a blank line) passes through."""
    batch: list[Record] = []
    chars = 0
    for record in records:
        batch.append(record)
        chars += sum(map(len, record[0] or ()))
        if len(batch) >= BATCH_RECORDS or chars >= BATCH_CHARS:
            yield from _encode_batch(batch, encoder, split)
            batch, chars = [], 0
    yield from _encode_batch(batch, encoder, split)
