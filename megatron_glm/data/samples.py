"""Windows of ``seq_length`` tokens cut from indexed datasets: splits, packing, epochs, caches.

A **window** is ``[CLS]`` followed by up to ``seq_length - 1`` tokens of the document stream, where
every document is its text followed by one ``[eos]`` (the one preprocessing appended, or one added
here). With ``pack_documents`` the stream of an epoch is all documents of the split in a shuffled
order and windows are cut back to back from it (GLM style: several documents per window, ``[eos]``
between them); without it, every document is cut into its own windows (the last one shorter).
The windows of an epoch are shuffled too. Epoch ``e`` draws both shuffles from (seed, split, e), so
global window ``i`` is window ``i % S`` of epoch ``i // S`` (``S`` windows per epoch) whatever the
number of epochs, workers or ranks: epochs wrap around with reshuffling.

The per-epoch index arrays (document order and window starts) are cached as ``.npy`` files named by a
hash of everything that determines them. One process (rank 0) writes them; the others memory-map
them after a barrier, and compute them in memory if a cache is missing (same result, only slower).

Blending (``--data-path 0.3 A 0.7 B``) is :mod:`~megatron_glm.data.blending`; the per-sample random
streams are :mod:`~megatron_glm.data.keyed_rng`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from megatron_glm.data.dataset_meta import read_dataset_meta
from megatron_glm.data.indexed_dataset import IndexedDataset, bin_path
from megatron_glm.data.keyed_rng import MASK64, TAG_GROUP, TAG_SAMPLE, KeyedRNG
from megatron_glm.errors import DataError

__all__ = [
    "TAG_GROUP",
    "TAG_SAMPLE",
    "DocumentWindows",
    "KeyedRNG",
    "Window",
    "cached_array",
    "parse_data_path",
    "parse_split",
    "split_ranges",
]

CACHE_VERSION = 1


# -- configuration strings -----------------------------------------------------------------------


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` (or ``949/50/1``) -> three weights summing to 1 (missing ones are 0)."""
    parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"split {split!r}: expected up to three numbers like '949,50,1'") from None
    if not weights or len(weights) > 3 or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise DataError(f"split {split!r}: expected up to three non-negative weights like '949,50,1'")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Document ranges ``[lo, hi)`` of the train, valid and test splits (contiguous, Megatron style)."""
    weights = parse_split(split)
    bounds = [0]
    acc = 0.0
    for w in weights:
        acc += w
        bounds.append(round(acc * num_documents))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def parse_data_path(data_path: Sequence[str]) -> list[tuple[float, str]]:
    """``[A]`` or ``[w1, A, w2, B, ...]`` -> normalised ``[(weight, prefix), ...]``."""
    items = list(data_path)
    if not items:
        raise DataError("data.data_path is empty: give a dataset prefix (--data-path PREFIX)")
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise DataError(f"data.data_path {items}: give one prefix, or weight/prefix pairs like '0.3 A 0.7 B'")
    pairs = []
    for w, prefix in zip(items[::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise DataError(f"data.data_path: {w!r} is not a weight (expected '0.3 A 0.7 B')") from None
        if not weight > 0 or not math.isfinite(weight):
            raise DataError(f"data.data_path: weight {w!r} of {prefix} must be positive")
        pairs.append((weight, prefix))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


# -- caches --------------------------------------------------------------------------------------


def cached_array(path: str, build: Callable[[], np.ndarray], write: bool) -> np.ndarray:
    """The array cached at ``path`` (memory-mapped), else ``build()``; saved atomically when ``write``."""
    if os.path.isfile(path):
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            if not write:
                raise DataError(f"{path}: unreadable index cache ({exc}); delete it to rebuild") from None
    array = build()
    if write:
        directory = os.path.dirname(path) or "."
        tmp = f"{path[:-4]}-{os.getpid()}.npy.tmp"
        try:
            os.makedirs(directory, exist_ok=True)
            with open(tmp, "wb") as stream:
                np.save(stream, array)
            os.replace(tmp, path)
        except OSError as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise DataError(
                f"{directory}: cannot write the sample-index cache ({exc.strerror}); "
                f"set data.cache_dir to a writable directory"
            ) from None
    return array


def check_token_bound(prefix: str, vocab_size: int) -> None:
    """Refuse a dataset whose recorded largest token id (its ``.meta.json``) does not fit ``vocab_size``."""
    record = read_dataset_meta(prefix)
    if record is None:
        return
    top = int(record.get("max_token_id", -1))
    if top >= vocab_size:
        raise DataError(
            f"{prefix}: its token ids go up to {top} (tokenizer of {record.get('vocab_size')} ids at "
            f"preprocessing) but this run's tokenizer has {vocab_size} ids; use the tokenizer it was "
            f"made with, or preprocess again"
        )


def digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# -- windows of one dataset ----------------------------------------------------------------------


class Window:
    """One window: ``tokens`` (int64, ``[CLS]`` first), ``sentence_starts`` (window positions where a
    sentence begins, or None when not asked for), the ``epoch`` it belongs to and its ``source`` (the prefix
    of the dataset it was cut from)."""

    __slots__ = ("epoch", "sentence_starts", "source", "tokens")

    def __init__(self, tokens: np.ndarray, sentence_starts: np.ndarray | None, epoch: int, source: str = "") -> None:
        self.tokens = tokens
        self.sentence_starts = sentence_starts
        self.epoch = epoch
        self.source = source


class DocumentWindows:
    """The windows of documents ``[lo, hi)`` of one indexed dataset, over any number of epochs.

    ``num_samples`` is how many windows training will ask for: that many epochs' indices are
    cached when ``build_cache`` (rank 0). Any window index works, cached or not. ``name`` tells the
    splits apart in the cache and in the shuffles.
    """

    def __init__(
        self,
        dataset: IndexedDataset | str,
        doc_range: tuple[int, int],
        seq_length: int,
        *,
        cls_id: int,
        eos_id: int,
        pack: bool = True,
        seed: int = 1234,
        name: str = "train",
        cache_dir: str = "",
        num_samples: int = 0,
        build_cache: bool = True,
        vocab_size: int = 0,
    ) -> None:
        ds = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        self.prefix = ds.prefix
        self.vocab_size = int(vocab_size)
        """Token ids must be below this (0: unchecked); checked on open (the sidecar's bound) and per window."""
        if self.vocab_size:
            check_token_bound(ds.prefix, self.vocab_size)
        self.seq_length = int(seq_length)
        self.width = self.seq_length - 1
        self.cls_id, self.eos_id = int(cls_id), int(eos_id)
        self.pack, self.seed, self.name = bool(pack), int(seed), name
        lo, hi = doc_range
        if not 0 <= lo <= hi <= ds.num_documents:
            raise DataError(f"{self.prefix}: document range {lo}..{hi} outside 0..{ds.num_documents}")
        self._ds = ds
        self._itemsize = ds.dtype.itemsize
        self._flat: np.ndarray | None = None
        self.has_sentences = len(ds) > ds.num_documents
        self._documents_index, self._pointers = ds.document_indices, ds.sequence_pointers
        doc_start, text_len = self._documents(ds, lo, hi)
        keep = text_len > 0
        self.doc_ids = np.arange(lo, hi, dtype=np.int64)[keep]
        self.doc_start = doc_start[keep]
        self.text_len = text_len[keep]
        stream = self.text_len + 1
        if self.pack:
            total = int(stream.sum())
            self.samples_per_epoch = total // self.width + int(total % self.width > 1)
        else:
            self._chunks = stream // self.width + (stream % self.width > 1)
            self.samples_per_epoch = int(self._chunks.sum())
        self.key = digest(
            "glm-windows",
            CACHE_VERSION,
            self.seq_length,
            self.pack,
            self.seed,
            self.name,
            lo,
            hi,
            self.cls_id,
            self.eos_id,
            self.text_len,
            self.doc_start,
        )
        stem = os.path.basename(self.prefix)
        self._cache_stem = os.path.join(
            cache_dir or os.path.dirname(os.path.abspath(self.prefix)), f"{stem}-{name}-{self.key}"
        )
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if build_cache and self.samples_per_epoch:
            for epoch in range(self.epochs_for(num_samples)):
                self._epoch(epoch, write=True)
            self._epochs.clear()  # reopen memory-mapped on first use

    def _documents(self, ds: IndexedDataset, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Token offset and text length (without a final [eos]) of documents lo..hi-1."""
        docs = ds.document_indices
        n = len(ds)
        first, last = docs[lo:hi].astype(np.int64), docs[lo + 1 : hi + 1].astype(np.int64)
        nonempty = last > first
        pointers, lengths = ds.sequence_pointers, ds.sequence_lengths
        start = np.zeros(hi - lo, dtype=np.int64)
        end = np.zeros(hi - lo, dtype=np.int64)
        if n:
            start[nonempty] = pointers[first[nonempty]] // self._itemsize
            tail = last[nonempty] - 1
            end[nonempty] = pointers[tail] // self._itemsize + lengths[tail]
        length = end - start
        has_tokens = length > 0
        ends_eos = np.zeros(hi - lo, dtype=bool)
        if has_tokens.any():
            ends_eos[has_tokens] = self.flat[end[has_tokens] - 1] == self.eos_id
        return start, length - ends_eos

    @property
    def flat(self) -> np.ndarray:
        """All tokens of the ``.bin`` file as one memory-mapped array."""
        if self._flat is None:
            if os.path.getsize(bin_path(self.prefix)) == 0:
                self._flat = np.zeros(0, dtype=self._ds.dtype)
            else:
                # A plain ndarray view: slicing an np.memmap costs several microseconds more.
                self._flat = np.memmap(bin_path(self.prefix), dtype=self._ds.dtype, mode="r").view(np.ndarray)
        return self._flat

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_flat"] = None
        state["_epochs"] = {}
        state["_documents_index"] = state["_pointers"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._documents_index, self._pointers = self._ds.document_indices, self._ds.sequence_pointers

    def epochs_for(self, num_samples: int) -> int:
        """Epochs needed for ``num_samples`` windows (at least one)."""
        if not self.samples_per_epoch:
            return 0
        return max(1, -(-int(num_samples) // self.samples_per_epoch))

    def __len__(self) -> int:
        """Windows per epoch."""
        return self.samples_per_epoch

    # -- index arrays --------------------------------------------------------------------------------

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed & MASK64, epoch, int(self.key, 16)])
        S, W = self.samples_per_epoch, self.width
        if self.pack:
            order = rng.permutation(len(self.text_len))
            stream = self.text_len[order] + 1
            ends = stream.cumsum()
            begin = np.arange(S, dtype=np.int64) * W
            pos = ends.searchsorted(begin, side="right")
            offset = begin - (ends[pos] - stream[pos])
        else:
            order = np.zeros(0, dtype=np.int64)
            pos = np.repeat(np.arange(len(self._chunks), dtype=np.int64), self._chunks)
            first = np.cumsum(self._chunks) - self._chunks
            offset = (np.arange(S, dtype=np.int64) - np.repeat(first, self._chunks)) * W
        windows = np.stack([pos, offset], axis=1)[rng.permutation(S)]
        small = len(self.text_len) < 2**31 and (offset.max(initial=0) < 2**31)
        return order.astype(np.int64), windows.astype(np.int32 if small else np.int64)

    def _epoch(self, epoch: int, write: bool = False) -> tuple[np.ndarray, np.ndarray]:
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        built: list[tuple[np.ndarray, np.ndarray]] = []

        def build(part: int) -> np.ndarray:
            if not built:
                built.append(self._build_epoch(epoch))
            return built[0][part]

        stem = f"{self._cache_stem}-e{epoch}"
        order = cached_array(f"{stem}-order.npy", lambda: build(0), write) if self.pack else build(0)
        windows = cached_array(f"{stem}-windows.npy", lambda: build(1), write)
        if len(self._epochs) >= 2:
            self._epochs.pop(next(iter(self._epochs)))
        self._epochs[epoch] = (order.view(np.ndarray), windows.view(np.ndarray))
        return self._epochs[epoch]

    # -- reading -------------------------------------------------------------------------------------

    def window(self, index: int, sentences: bool = False) -> Window:
        """Window ``index`` (any non-negative integer; epoch ``index // len(self)``)."""
        if not self.samples_per_epoch:
            raise IndexError(f"{self.prefix} ({self.name}): no documents with text in this split")
        epoch, j = divmod(int(index), self.samples_per_epoch)
        order, windows = self._epoch(epoch)
        pos, offset = int(windows[j, 0]), int(windows[j, 1])
        out = np.empty(self.seq_length, dtype=np.int64)
        out[0] = self.cls_id
        filled, need = 1, self.width
        starts: list[np.ndarray] = []
        flat, text_len, doc_start = self.flat, self.text_len, self.doc_start
        while need > 0:
            doc = int(order[pos]) if self.pack else pos
            length = int(text_len[doc])
            take_text = min(length - offset, need) if offset < length else 0
            if take_text > 0:
                begin = int(doc_start[doc]) + offset
                out[filled : filled + take_text] = flat[begin : begin + take_text]
                if self.vocab_size:
                    self._check_ids(out[filled : filled + take_text], doc, offset)
                if sentences:
                    starts.append(self._sentence_starts(doc, offset, offset + take_text) + (filled - offset))
                filled += take_text
                need -= take_text
            if need > 0:  # the document's [eos]
                out[filled] = self.eos_id
                filled += 1
                need -= 1
            if not self.pack or need == 0:
                break
            pos += 1
            offset = 0
            if pos >= len(order):
                break
        sentence_starts = None
        if sentences:
            sentence_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        return Window(out[:filled], sentence_starts, epoch, self.prefix)

    def _check_ids(self, ids: np.ndarray, doc: int, offset: int) -> None:
        """Guard of the batch path: a token id outside the vocabulary (a corrupt ``.bin``) is an error naming
        the dataset and the document, in every parallel layout (a vocab-parallel embedding would silently
        treat it as another shard's)."""
        top, low = int(ids.max()), int(ids.min())
        if top >= self.vocab_size or low < 0:
            bad = top if top >= self.vocab_size else low
            where = offset + int(np.argmax((ids >= self.vocab_size) | (ids < 0)))
            raise DataError(
                f"{bin_path(self.prefix)}: document {int(self.doc_ids[doc])} holds token id {bad} at "
                f"token {where}, outside the tokenizer's {self.vocab_size} ids; the file is corrupt or "
                f"was made with another tokenizer (preprocess again)"
            )

    def _sentence_starts(self, doc: int, lo: int, hi: int) -> np.ndarray:
        """Document-local token offsets in ``[lo, hi)`` where a sentence (sequence) begins."""
        d = int(self.doc_ids[doc])
        docs = self._documents_index
        pointers = self._pointers[int(docs[d]) : int(docs[d + 1])]
        size, base = self._itemsize, int(self.doc_start[doc])
        a, b = pointers.searchsorted(((base + lo) * size, (base + hi) * size))
        return pointers[a:b] // size - base
