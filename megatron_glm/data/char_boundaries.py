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
        self.char_start = ~self.continuation
        self.multibyte = self.continuation | (self.lead > 0)
        self._last = len(self.continuation) - 1
        self._cont_bytes = self.continuation.tobytes()  # scalar look-ups without numpy's per-call cost
        self._lead_bytes = self.lead.astype(np.uint8).tobytes()

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

    def orphans(self, tokens: np.ndarray, cls: int) -> tuple[int, int]:
        """``(first, k)``: the text starts at ``first`` (1 after a leading ``cls``) with ``k`` continuation pieces
        (a window cut inside a character)."""
        head = tokens[:4].tolist()
        first = int(head[0] == cls)
        cont, last, k = self._cont_bytes, self._last, first
        while k < len(head) and cont[min(head[k], last)]:
            k += 1
        return first, k - first

    def whole_end(self, tokens: np.ndarray, n: int) -> int:
        """The largest ``m <= n`` such that ``tokens[:m]`` does not end inside a character."""
        cont, last = self._cont_bytes, self._last
        j, stop = n - 1, max(0, n - 4)
        while j >= stop and cont[min(int(tokens[j]), last)]:
            j -= 1
        if j < stop:
            return n
        return j if self._lead_bytes[min(int(tokens[j]), last)] > n - 1 - j else n

    def _inside(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> bool:
        """Whether any span edge falls inside a character (an edge at the end of ``tokens`` does not)."""
        if len(starts) <= 4:  # a few edges (document, sentence objectives): plain look-ups beat numpy calls
            cont, last, size = self._cont_bytes, self._last, len(tokens)
            return any(cont[min(int(tokens[p]), last)] for p in (*starts.tolist(), *ends.tolist()) if p < size)
        edges = tokens.take(np.concatenate((starts, ends)), mode="clip")
        return bool(np.count_nonzero(self.continuation.take(edges, mode="clip")))

    def snap(
        self, tokens: np.ndarray, starts: np.ndarray, lens: np.ndarray, n: int, barrier: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Spans (sorted, disjoint, inside ``tokens[:n]``) moved onto character boundaries; returns the new
        ``(starts, lens, n)``. ``barrier`` is the sampler's lookup of ids a span never covers ([CLS], [eos])."""
        if not np.count_nonzero(self.multibyte.take(tokens[:n], mode="clip")):
            return starts, lens, n  # no character spelled in bytes here (an English window): nothing to move
        n = self.whole_end(tokens, n)
        if len(starts) == 0 or n == 0:
            return starts[:0], lens[:0], n
        ends = starts + lens
        clipped = ends[-1] > n
        if clipped:  # the cut end of Part A moved back: clip the last spans
            starts, ends = np.minimum(starts, n), np.minimum(ends, n)
        if not self._inside(tokens, starts, ends):
            if clipped:
                keep = ends > starts
                starts, ends = starts[keep], ends[keep]
            return starts, ends - starts, n
        is_start = self.char_start.take(tokens[: n + 1], mode="clip")
        if len(is_start) > n:
            is_start[n] = True  # the end of Part A is a boundary
        bounds = np.flatnonzero(is_start)  # character starts
        if len(is_start) == n:
            bounds = np.append(bounds, n)
        at = bounds.searchsorted(starts, side="right") - 1
        lo = bounds[at]  # at = -1 only with an orphan at 0, handled below
        orphan = bounds[0] > 0 or (len(bounds) > 1 and bounds[1] > 1 and barrier.take(tokens[0], mode="clip"))
        if orphan:
            # an orphan byte opens the window: a span never grows over [CLS], it starts after the orphans
            blocked = (at < 0) | (barrier.take(tokens.take(lo), mode="clip") & (lo < starts))
            lo = np.where(blocked, bounds[bounds.searchsorted(starts, side="left")], lo)
        hi = bounds[bounds.searchsorted(ends, side="left")]
        touch = lo[1:] <= hi[:-1]  # spans that now touch or overlap become one (hi is sorted)
        if np.count_nonzero(touch):
            first = np.flatnonzero(np.concatenate(([True], ~touch)))
            last = np.append(first[1:], len(hi)) - 1
            lo, hi = lo[first], hi[last]
        if clipped or orphan:  # a span wholly past the end or on the orphans is empty now
            keep = hi > lo
            lo, hi = lo[keep], hi[keep]
        return lo, hi - lo, n
