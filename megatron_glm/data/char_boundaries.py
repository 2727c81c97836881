"""Character boundaries in token windows: blanks must not cut a character spelled in byte-fallback pieces.

A sentencepiece model with byte fallback spells a character it has no piece for as its UTF-8 bytes, one piece
each (``<0xE5><0xA6><0x82>``). A blank that starts or ends between two of those pieces leaves half a character
in Part A and half in Part B, both of which decode to U+FFFD. :class:`CharBoundaries` is built once per
tokenizer (two lookup tables over the vocabulary) and moves span boundaries onto character boundaries: a span
grows to cover every character it touches, spans that then touch merge, and the end of Part A is cut back to
the last whole character. A window that starts inside a character (packed windows are cut anywhere) loses
those orphan continuation bytes up front.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["CharBoundaries"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _utf8_continuations(byte: int) -> int:
    """How many continuation bytes follow the lead byte ``byte`` (0 for ASCII or a continuation byte)."""
    return 1 if 0xC0 <= byte < 0xE0 else 2 if 0xE0 <= byte < 0xF0 else 3 if 0xF0 <= byte < 0xF8 else 0


class CharBoundaries:
    """``continuation[id]``: the id is a byte piece ``0x80..0xBF`` (inside a character, never its start);
    ``lead[id]``: how many continuation bytes the id's byte piece starts (0 for every other id). Ids past the
    tables (command tokens) are neither."""

    def __init__(self, continuation: np.ndarray, lead: np.ndarray) -> None:
        self.continuation = np.append(np.asarray(continuation, dtype=bool), False)
        self.lead = np.append(np.asarray(lead, dtype=np.int8), 0)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> CharBoundaries | None:
        """The tables of ``tokenizer`` (``base_vocab_size`` or ``vocab_size`` ids, ``id_to_token``), or None when
        it has no multi-byte byte pieces (nothing to guard: the sampler then runs as before)."""
        size = int(getattr(tokenizer, "base_vocab_size", 0) or getattr(tokenizer, "vocab_size", 0))
        continuation = np.zeros(size, dtype=bool)
        lead = np.zeros(size, dtype=np.int8)
        for token_id in range(size):
            piece = tokenizer.id_to_token(token_id)
            if len(piece) != 6 or not piece.startswith("<0x"):
                continue
            found = _BYTE_PIECE.fullmatch(piece)
            if found:
                byte = int(found[1], 16)
                continuation[token_id] = 0x80 <= byte < 0xC0
                lead[token_id] = _utf8_continuations(byte)
        if not continuation.any():
            return None
        return cls(continuation, lead)

    def orphans(self, tokens: np.ndarray, first: int) -> int:
        """How many continuation pieces start the text at ``first`` (a window cut inside a character)."""
        k = first
        while k < len(tokens) and k - first < 3 and self.continuation.take(tokens[k], mode="clip"):
            k += 1
        return k - first

    def whole_end(self, tokens: np.ndarray, n: int) -> int:
        """The largest ``m <= n`` such that ``tokens[:m]`` does not end inside a character."""
        j = n - 1
        while j >= max(0, n - 4) and self.continuation.take(tokens[j], mode="clip"):
            j -= 1
        if j < max(0, n - 4):
            return n
        return j if int(self.lead.take(tokens[j], mode="clip")) > n - 1 - j else n

    def snap(
        self, tokens: np.ndarray, starts: np.ndarray, lens: np.ndarray, n: int, barrier: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Spans (sorted, disjoint, inside ``tokens[:n]``) moved onto character boundaries; returns the new
        ``(starts, lens, n)``. ``barrier`` is the sampler's lookup of ids a span never covers ([CLS], [eos])."""
        n = self.whole_end(tokens, n)
        if n == 0:
            return starts[:0], lens[:0], 0
        cont = self.continuation.take(tokens[:n], mode="clip")
        ends = np.minimum(starts + lens, n)
        starts = np.minimum(starts, n)
        if not cont.any():
            keep = ends > starts
            return starts[keep], (ends - starts)[keep], n
        bounds = np.append(np.flatnonzero(~cont), n)  # where a character starts, and the end
        at = bounds.searchsorted(starts, side="right") - 1
        lo = bounds[np.maximum(at, 0)]
        # A span never grows over a barrier (an orphan byte right after [CLS]): it starts after it instead.
        blocked = (at < 0) | (barrier.take(tokens.take(np.minimum(lo, n - 1)), mode="clip") & (lo < starts))
        lo = np.where(blocked, bounds[bounds.searchsorted(starts, side="left")], lo)
        hi = bounds[bounds.searchsorted(ends, side="left")]
        hi = np.maximum(hi, lo)
        if len(lo) > 1:  # spans that now touch or overlap become one
            new = np.ones(len(lo), dtype=bool)
            new[1:] = lo[1:] > np.maximum.accumulate(hi)[:-1]
            first = np.flatnonzero(new)
            lo, hi = lo[first], np.maximum.reduceat(hi, first)
        keep = hi > lo
        return lo[keep], (hi - lo)[keep], n
