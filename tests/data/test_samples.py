"""Windows, splits, packing, epochs, blending and index caches."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from megatron_glm.data.blending import BlendedWindows, blend_schedule
from megatron_glm.data.samples import (
    DocumentWindows,
    KeyedRNG,
    cached_array,
    parse_data_path,
    parse_split,
    split_ranges,
)
from megatron_glm.errors import DataError

EOS, CLS = 101, 102


def random_documents(seed: int, count: int, eos_every: int = 2, max_sentences: int = 6) -> list[list[list[int]]]:
    """Documents of sentences of ids < 100; every ``eos_every``-th document already ends in [eos]."""
    rng = np.random.default_rng(seed)
    docs = []
    for k in range(count):
        sentences = [
            rng.integers(0, 100, int(rng.integers(1, 15))).tolist()
            for _ in range(int(rng.integers(1, max_sentences + 1)))
        ]
        if k % eos_every == 0:
            sentences[-1].append(EOS)
        docs.append(sentences)
    return docs


def text_of(doc: list[list[int]]) -> list[int]:
    flat = [t for s in doc for t in s]
    return flat[:-1] if flat and flat[-1] == EOS else flat


def windows_for(ds, L, pack, tmp_path, lo=0, hi=None, **kw) -> DocumentWindows:
    hi = ds.num_documents if hi is None else hi
    return DocumentWindows(
        ds,
        (lo, hi),
        L,
        cls_id=CLS,
        eos_id=EOS,
        pack=pack,
        seed=kw.pop("seed", 7),
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )


@pytest.mark.parametrize("L", [8, 16, 33])
def test_packed_windows_cover_the_shuffled_stream(make_indexed_dataset, tmp_path, L) -> None:
    docs = random_documents(0, 40)
    docs.insert(5, [[]])  # an empty document is skipped
    docs.insert(9, [[EOS]])  # and so is one holding only [eos]
    ds = make_indexed_dataset(docs)
    w = windows_for(ds, L, True, tmp_path, num_samples=100)
    assert len(w.text_len) == 40
    S = len(w)
    for epoch in range(3):
        order, windows = w._epoch(epoch)
        by_doc = [d for d in range(len(docs)) if text_of(docs[d])]
        stream = []
        for k in order.tolist():
            stream += [*text_of(docs[by_doc[k]]), EOS]
        starts = sorted(range(S), key=lambda j: (int(windows[j, 0]), int(windows[j, 1])))
        got = []
        for j in starts:
            win = w.window(epoch * S + j)
            assert win.epoch == epoch and win.tokens[0] == CLS and len(win.tokens) <= L
            got += win.tokens[1:].tolist()
        assert len(got) >= len(stream) - 1
        assert got == stream[: len(got)], "windows cut the stream back to back"
        assert all(len(w.window(epoch * S + j).tokens) == L for j in starts[:-1])
    assert not np.array_equal(w._epoch(0)[0], w._epoch(1)[0]), "epochs reshuffle the documents"


def test_unpacked_windows_stay_inside_documents(make_indexed_dataset, tmp_path) -> None:
    docs = random_documents(1, 30, max_sentences=12)
    ds = make_indexed_dataset(docs)
    L = 16
    w = windows_for(ds, L, False, tmp_path)
    pieces: dict[int, list[int]] = {}
    for j in range(len(w)):
        win = w.window(j)
        assert win.tokens[0] == CLS and 2 <= len(win.tokens) <= L
        _, windows = w._epoch(0)
        doc = int(windows[j, 0])
        pieces.setdefault(doc, []).append((int(windows[j, 1]), win.tokens[1:].tolist()))
    for doc, parts in pieces.items():
        got = [t for _, p in sorted(parts) for t in p]
        text = text_of(docs[doc])
        assert got == ([*text, EOS])[: len(got)] and len(got) >= len(text)
        assert got.count(EOS) <= 1


def test_sentence_starts(make_indexed_dataset, tmp_path) -> None:
    docs = random_documents(2, 30)
    ds = make_indexed_dataset(docs)
    w = windows_for(ds, 24, True, tmp_path)
    order, windows = w._epoch(0)
    stream, marks = [], []
    for k in order.tolist():
        doc = docs[k]
        for sentence in doc:
            marks += [True] + [False] * (len(sentence) - 1)
            stream += sentence
        if stream[-1] != EOS:
            stream.append(EOS)
            marks.append(False)
    lengths = [len(text_of(docs[k])) + 1 for k in order.tolist()]
    begin = np.concatenate(([0], np.cumsum(lengths)))
    for j in range(len(w)):
        win = w.window(j, sentences=True)
        at = int(begin[windows[j, 0]] + windows[j, 1])
        assert win.tokens[1:].tolist() == stream[at : at + len(win.tokens) - 1]
        expected = [1 + i for i in range(len(win.tokens) - 1) if marks[at + i] and stream[at + i] != EOS]
        assert win.sentence_starts.tolist() == expected
    assert w.window(0).sentence_starts is None
    assert w.has_sentences


def test_epochs_wrap_with_the_same_windows_in_another_order(make_indexed_dataset, tmp_path) -> None:
    ds = make_indexed_dataset(random_documents(3, 25))
    w = windows_for(ds, 16, False, tmp_path)
    S = len(w)
    first = sorted(tuple(w.window(j).tokens.tolist()) for j in range(S))
    second = sorted(tuple(w.window(S + j).tokens.tolist()) for j in range(S))
    assert first == second
    assert [w.window(j).tokens.tolist() for j in range(S)] != [w.window(S + j).tokens.tolist() for j in range(S)]
    assert w.window(5 * S + 3).epoch == 5


def test_caches_are_written_once_and_memory_mapped(make_indexed_dataset, tmp_path) -> None:
    ds = make_indexed_dataset(random_documents(4, 30))
    w0 = windows_for(ds, 16, True, tmp_path, num_samples=0)
    cache = tmp_path / "cache"
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and all(f.endswith(".npy") for f in files)
    w3 = windows_for(ds, 16, True, tmp_path, num_samples=3 * len(w0))
    assert len(os.listdir(cache)) == 6, "one order and one window file per epoch"
    mtimes = {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)}
    reader = windows_for(ds, 16, True, tmp_path, build_cache=False)
    _order, windows = reader._epoch(2)
    assert not windows.flags.owndata and not windows.flags.writeable, "memory-mapped"
    assert {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)} == mtimes
    # No cache at all: the same windows, computed in memory.
    lonely = DocumentWindows(
        ds, (0, 30), 16, cls_id=CLS, eos_id=EOS, seed=7, cache_dir=str(tmp_path / "none"), build_cache=False
    )
    assert not (tmp_path / "none").exists()
    for j in range(0, 3 * len(w0), 7):
        assert np.array_equal(reader.window(j).tokens, w3.window(j).tokens)
        assert np.array_equal(lonely.window(j).tokens, w3.window(j).tokens)
    # What determines the windows is in the key.
    other = windows_for(ds, 16, True, tmp_path, seed=8)
    assert other.key != w0.key
    assert windows_for(ds, 16, True, tmp_path, lo=1).key != w0.key
    assert windows_for(ds, 17, True, tmp_path).key != w0.key


def test_cache_next_to_the_data_by_default(make_indexed_dataset) -> None:
    ds = make_indexed_dataset(random_documents(5, 10), name="corpus")
    DocumentWindows(ds, (0, 10), 16, cls_id=CLS, eos_id=EOS)
    names = os.listdir(os.path.dirname(ds.prefix))
    assert any(n.startswith("corpus-train-") and n.endswith("-windows.npy") for n in names)
    assert not any(n.endswith(".tmp") for n in names)


def test_unwritable_cache_is_one_clear_error(make_indexed_dataset, tmp_path) -> None:
    ds = make_indexed_dataset(random_documents(6, 10))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cache"):
        DocumentWindows(ds, (0, 10), 16, cls_id=CLS, eos_id=EOS, cache_dir=str(blocker / "sub"))


def test_cached_array_is_atomic(tmp_path) -> None:
    path = str(tmp_path / "a.npy")
    calls = []

    def build():
        calls.append(1)
        return np.arange(5)

    assert cached_array(path, build, True).tolist() == [0, 1, 2, 3, 4]
    assert cached_array(path, build, True).tolist() == [0, 1, 2, 3, 4]
    assert len(calls) == 1 and os.listdir(tmp_path) == ["a.npy"]


def test_split_strings() -> None:
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert parse_split("1/1") == pytest.approx([0.5, 0.5, 0.0])
    assert split_ranges(1000, "949,50,1") == [(0, 949), (949, 999), (999, 1000)]
    assert split_ranges(10, "100,0,0") == [(0, 10), (10, 10), (10, 10)]
    ranges = split_ranges(7, "1,1,1")
    assert ranges[0][0] == 0 and ranges[-1][1] == 7 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    for bad in ("", "a,b", "1,2,3,4", "-1,2", "0,0,0"):
        with pytest.raises(DataError):
            parse_split(bad)


def test_data_path() -> None:
    assert parse_data_path(["A"]) == [(1.0, "A")]
    assert parse_data_path(["3", "A", "1", "B"]) == [(0.75, "A"), (0.25, "B")]
    for bad in ([], ["A", "B"], ["0.3", "A", "0.7"], ["x", "A", "1", "B"], ["0", "A", "1", "B"]):
        with pytest.raises(DataError):
            parse_data_path(bad)


def test_blend_schedule_tracks_the_weights() -> None:
    weights = [0.5, 0.3, 0.2]
    which, index = blend_schedule(weights, 10000)
    assert len(which) == 10000
    counts = np.zeros(3)
    for i, d in enumerate(which.tolist()):
        counts[d] += 1
        assert np.all(np.abs(counts - np.asarray(weights) * (i + 1)) <= 1.0 + 1e-9)
    for d in range(3):
        assert index[which == d].tolist() == list(range(int((which == d).sum())))
    # A prefix of a longer schedule is the shorter schedule.
    short = blend_schedule(weights, 1000)
    assert np.array_equal(short[0], which[:1000]) and np.array_equal(short[1], index[:1000])


def test_blended_windows(make_indexed_dataset, tmp_path) -> None:
    a = make_indexed_dataset(random_documents(7, 20), name="a")
    b = make_indexed_dataset([[[50] * 10 + [EOS]] for _ in range(20)], name="b")
    wa = windows_for(a, 16, True, tmp_path)
    wb = windows_for(b, 16, True, tmp_path)
    blend = BlendedWindows([wa, wb], [0.25, 0.75], 400, cache_dir=str(tmp_path / "cache"))
    from_b = sum(set(blend.window(i).tokens.tolist()) <= {CLS, EOS, 50} for i in range(400))
    assert abs(from_b - 300) <= 5
    assert [blend.locate(i) for i in range(4)] == [(1, 0), (0, 0), (1, 1), (1, 2)]
    reader = BlendedWindows([wa, wb], [0.25, 0.75], 400, cache_dir=str(tmp_path / "cache"), build_cache=False)
    assert not reader.schedule[0].flags.writeable, "memory-mapped"
    for i in (0, 17, 399, 1234):
        assert np.array_equal(reader.window(i).tokens, blend.window(i).tokens)


def test_keyed_rng_streams() -> None:
    rng = KeyedRNG()
    a = rng(1, 0, 5).random(4)
    assert np.array_equal(rng(1, 0, 5).random(4), a)
    for other in ((2, 0, 5), (1, 1, 5), (1, 0, 6), (1, 0, 5, 1), (-1, 0, 5)):
        assert not np.array_equal(rng(*other).random(4), a)
    import pickle

    assert np.array_equal(pickle.loads(pickle.dumps(rng))(1, 0, 5).random(4), a)


def test_pickles_without_the_data(make_indexed_dataset, tmp_path) -> None:
    import pickle

    ds = make_indexed_dataset(random_documents(8, 20))
    w = windows_for(ds, 16, True, tmp_path)
    w.window(0)
    clone = pickle.loads(pickle.dumps(w))
    assert len(pickle.dumps(w)) < 20000
    for j in range(len(w)):
        assert np.array_equal(clone.window(j).tokens, w.window(j).tokens)
