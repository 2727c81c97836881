"""The Megatron .bin/.idx format: exact bytes, megatron-core compatibility, validation, atomic writes."""

from __future__ import annotations

import os
import pickle
import struct
import warnings

import numpy as np
import pytest

from megatron_glm.data import indexed_builder
from megatron_glm.data.indexed_builder import IndexedDatasetBuilder
from megatron_glm.data.indexed_dataset import DTYPE_CODES, IndexedDataset, best_dtype
from megatron_glm.errors import DataError

from .conftest import write_documents

EXAMPLE = [[[5, 6, 7], [8, 9]], [[1]], [[2, 3, 4, 5]]]


def random_documents(rng: np.random.Generator, n_docs: int, high: int) -> list[list[np.ndarray]]:
    """Documents of 0-4 sequences of 0-40 tokens (empty sequences and documents included)."""
    return [[rng.integers(0, high, size=rng.integers(0, 40)) for _ in range(rng.integers(0, 5))] for _ in range(n_docs)]


def assert_matches(ds: IndexedDataset, documents) -> None:
    sequences = [np.asarray(s) for doc in documents for s in doc]
    assert len(ds) == len(sequences)
    assert ds.num_documents == len(documents)
    assert ds.sequence_lengths.tolist() == [len(s) for s in sequences]
    assert ds.document_indices.tolist() == [0, *np.cumsum([len(d) for d in documents]).tolist()]
    for i, seq in enumerate(sequences):
        assert ds[i].tolist() == seq.tolist()


def test_reference_example_bytes(tmp_path):
    """glm-reference.md section 4: lengths 3,2,1,4; pointers 0,6,10,12; document indices 0,2,3,4."""
    prefix = write_documents(tmp_path / "ex", EXAMPLE, np.uint16)
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 8, 4, 4)
        + np.array([3, 2, 1, 4], "<i4").tobytes()
        + np.array([0, 6, 10, 12], "<i8").tobytes()
        + np.array([0, 2, 3, 4], "<i8").tobytes()
    )
    with open(prefix + ".idx", "rb") as f:
        assert f.read() == expected_idx
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == np.array([5, 6, 7, 8, 9, 1, 2, 3, 4, 5], "<u2").tobytes()
    ds = IndexedDataset(prefix)
    assert_matches(ds, EXAMPLE)
    assert ds.dtype == np.uint16
    assert ds.sequence_pointers.tolist() == [0, 6, 10, 12]
    assert ds.num_tokens == 10
    assert [s.tolist() for s in ds.document(0)] == EXAMPLE[0]


@pytest.mark.parametrize("dtype", list(DTYPE_CODES.values()), ids=str)
def test_round_trip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(1)
    high = min(int(np.iinfo(dtype).max), 1 << 40)
    documents = random_documents(rng, 30, high)
    ds = IndexedDataset(write_documents(tmp_path / "rt", documents, dtype))
    assert ds.dtype == dtype
    assert_matches(ds, documents)


def test_access_views_and_partial_reads(make_indexed_dataset):
    ds = make_indexed_dataset(EXAMPLE)
    view = ds[3]
    assert not view.flags.writeable and not view.flags.owndata  # zero-copy view of the map
    assert ds[-1].tolist() == [2, 3, 4, 5]
    assert ds.get(3, offset=1, length=2).tolist() == [3, 4]
    assert ds.get(3, offset=2).tolist() == [4, 5]
    assert ds.get(np.int64(0)).tolist() == [5, 6, 7]
    assert [s.tolist() for s in ds[1:3]] == [[8, 9], [1]]
    with pytest.raises(IndexError, match="out of range for 4 sequences"):
        ds[4]
    with pytest.raises(IndexError, match="out of range for sequence 3 of length 4"):
        ds.get(3, offset=3, length=2)
    with pytest.raises(IndexError):
        ds.document(3)


def test_add_document_and_merge(tmp_path):
    a = write_documents(tmp_path / "a", EXAMPLE[:2])
    b = write_documents(tmp_path / "b", EXAMPLE[2:])
    with IndexedDatasetBuilder(tmp_path / "merged.bin", np.uint16) as builder:
        builder.add_index(a)
        builder.add_document([0, 0, 7], lengths=[1, 2])
        builder.add_index(b)
    merged = IndexedDataset(tmp_path / "merged")
    assert_matches(merged, [*EXAMPLE[:2], [[0], [0, 7]], *EXAMPLE[2:]])
    with pytest.raises(DataError, match="does not split into sequence lengths"):
        IndexedDatasetBuilder(tmp_path / "x", np.uint16).add_document([1, 2, 3], [1, 1])


def test_merge_rejects_other_dtype(tmp_path):
    a = write_documents(tmp_path / "a", EXAMPLE, np.int32)
    builder = IndexedDatasetBuilder(tmp_path / "b", np.uint16)
    with pytest.raises(DataError, match=r"a\.idx: dtype int32 does not match the builder's uint16"):
        builder.add_index(a)
    builder.abort()


def test_empty_dataset(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "empty", np.uint16):
        pass
    ds = IndexedDataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.document_indices.tolist() == [0]


def test_finalize_closes_open_document(tmp_path):
    builder = IndexedDatasetBuilder(tmp_path / "open", np.uint16)
    builder.add_item([1, 2])
    builder.end_document()
    builder.add_item([3])
    builder.finalize()
    assert IndexedDataset(tmp_path / "open").document_indices.tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError, match="already finalized"):
        builder.add_item([4])


def test_token_overflow_is_rejected(tmp_path):
    builder = IndexedDatasetBuilder(tmp_path / "o", np.uint16)
    with pytest.raises(DataError, match=r"token ids 0\.\.70000 do not fit dtype uint16"):
        builder.add_item(np.array([0, 70000]))
    builder.abort()
    with pytest.raises(DataError, match="cannot be stored"):
        IndexedDatasetBuilder(tmp_path / "f", np.float32)


def test_interrupted_build_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), IndexedDatasetBuilder(tmp_path / "partial", np.uint16) as builder:
        builder.add_item([1, 2, 3])
        builder.end_document()
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_spilled_index_is_identical(tmp_path, monkeypatch):
    """The builder spills its index arrays to disk (bounded memory); the bytes must not change."""
    rng = np.random.default_rng(2)
    documents = random_documents(rng, 200, 60000)
    write_documents(tmp_path / "memory", documents)
    monkeypatch.setattr(indexed_builder, "_SPILL_ENTRIES", 7)
    write_documents(tmp_path / "spilled", documents)
    extra = write_documents(tmp_path / "extra", documents[:50])
    with IndexedDatasetBuilder(tmp_path / "spilled_merge", np.uint16) as builder:
        builder.add_index(tmp_path / "spilled")
        builder.add_index(extra)
    for suffix in (".bin", ".idx"):
        with open(tmp_path / f"memory{suffix}", "rb") as f1, open(tmp_path / f"spilled{suffix}", "rb") as f2:
            assert f1.read() == f2.read()
    assert_matches(IndexedDataset(tmp_path / "spilled_merge"), documents + documents[:50])
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{name}{suffix}" for name in ("memory", "spilled", "extra", "spilled_merge") for suffix in (".bin", ".idx")
    )


def test_pickle_reopens(make_indexed_dataset):
    ds = make_indexed_dataset(EXAMPLE)
    clone = pickle.loads(pickle.dumps(ds))
    assert_matches(clone, EXAMPLE)


def test_best_dtype():
    assert best_dtype(4011) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(None) == np.int32


# -- corrupt, truncated and mismatched files ------------------------------------------------------------


def _corrupt(prefix: str, suffix: str, offset: int, data: bytes | None = None, truncate: int | None = None):
    path = prefix + suffix
    with open(path, "r+b") as f:
        if data is not None:
            f.seek(offset)
            f.write(data)
        if truncate is not None:
            f.truncate(truncate)
    return path


@pytest.mark.parametrize(
    ("suffix", "offset", "data", "truncate", "message"),
    [
        (".idx", 0, b"XXIDIDX", None, r"not a Megatron index file \(magic"),
        (".idx", 9, struct.pack("<Q", 2), None, "index version 2, expected 1"),
        (".idx", 17, bytes([7]), None, "dtype code 7 is not a token dtype"),
        (".idx", 0, None, 20, "truncated index: 20 bytes"),
        (
            ".idx",
            0,
            None,
            100,
            r"index is 100 bytes but its header \(4 sequences, 4 document entries\) needs 114",
        ),
        (".idx", 26, struct.pack("<Q", 5), None, "needs 122; the file is truncated or corrupt"),
        (".bin", 0, None, 18, r"data file is 18 bytes but .*ds\.idx points to 20 bytes of uint16 tokens"),
        (".bin", 20, b"\x00\x00", None, "data file is 22 bytes but"),
        (".idx", 34 + 16 + 8, struct.pack("<q", 7), None, "sequence 1 points to byte 7, expected 6"),
        (".idx", 34 + 4, struct.pack("<i", -1), None, "sequence 1 has negative length -1"),
        (".idx", 34 + 48 + 24, struct.pack("<q", 3), None, "document indices run from 0 to 3"),
        (".idx", 34 + 48 + 8, struct.pack("<q", 4), None, "document index 2 goes backwards"),
    ],
)
def test_corrupt_files_are_reported(make_indexed_dataset, suffix, offset, data, truncate, message):
    prefix = make_indexed_dataset(EXAMPLE).prefix
    _corrupt(prefix, suffix, offset, data, truncate)
    with pytest.raises(DataError, match=message) as info:
        IndexedDataset(prefix)
    assert os.path.basename(prefix) in str(info.value) and "\n" not in str(info.value)


def test_missing_files_are_reported(make_indexed_dataset):
    prefix = make_indexed_dataset(EXAMPLE).prefix
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=r"ds\.bin: indexed dataset file not found"):
        IndexedDataset(prefix)
    assert not IndexedDataset.exists(prefix)


def test_mismatched_pair_is_reported(tmp_path):
    a = write_documents(tmp_path / "a", EXAMPLE)
    b = write_documents(tmp_path / "b", [[[1, 2, 3, 4, 5, 6]]])
    os.replace(b + ".bin", a + ".bin")
    with pytest.raises(DataError, match=r"a\.bin: data file is 12 bytes but .*a\.idx points to 20 bytes"):
        IndexedDataset(a)


# -- megatron-core compatibility ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron_indexed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset as megatron_indexed
    return megatron_indexed


def _megatron_write(module, prefix: str, documents, dtype) -> None:
    import torch

    builder = module.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        for sequence in document:
            builder.add_item(torch.from_numpy(np.asarray(sequence, dtype=np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_megatron_core_byte_identity(tmp_path, megatron_indexed, dtype):
    rng = np.random.default_rng(3)
    documents = random_documents(rng, 120, min(int(np.iinfo(dtype).max), 50000))
    ours = write_documents(tmp_path / "ours", documents, dtype)
    theirs = str(tmp_path / "theirs")
    _megatron_write(megatron_indexed, theirs, documents, dtype)
    assert _same_bytes(ours + ".bin", theirs + ".bin")
    assert _same_bytes(ours + ".idx", theirs + ".idx")

    # megatron-core reads our files; we read its files; both see the same sequences and documents.
    mine = IndexedDataset(theirs)
    other = megatron_indexed.IndexedDataset(ours)
    assert_matches(mine, documents)
    assert len(other) == len(mine)
    assert np.array_equal(other.sequence_lengths, mine.sequence_lengths)
    assert np.array_equal(other.document_indices, mine.document_indices)
    for i in range(len(mine)):
        assert np.array_equal(other[i], mine[i])
        if mine.sequence_lengths[i] > 2:
            assert np.array_equal(other.get(i, 1, 2), mine.get(i, 1, 2))


def test_megatron_core_merge_identity(tmp_path, megatron_indexed):
    rng = np.random.default_rng(4)
    parts = [random_documents(rng, 40, 60000) for _ in range(3)]
    prefixes = [write_documents(tmp_path / f"part{i}", docs) for i, docs in enumerate(parts)]
    with IndexedDatasetBuilder(tmp_path / "ours", np.uint16) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
    theirs = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for prefix in prefixes:
        theirs.add_index(prefix)
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        assert _same_bytes(str(tmp_path / f"ours{suffix}"), str(tmp_path / f"theirs{suffix}"))
    assert_matches(IndexedDataset(tmp_path / "ours"), [d for docs in parts for d in docs])
