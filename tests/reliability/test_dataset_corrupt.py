"""Corrupt, truncated or foreign ``.bin/.idx`` datasets: a clear error naming the file (and the document)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.config import build_config
from megatron_glm.data.dataset_meta import dataset_fingerprint, read_dataset_meta
from megatron_glm.data.indexed_dataset import IndexedDataset
from megatron_glm.data.loader import build_pretraining_datasets
from megatron_glm.data.preprocess import PreprocessConfig, preprocess
from megatron_glm.data.samples import DocumentWindows
from megatron_glm.errors import DataError
from tests.training.conftest import launch, train_args


def _dataset(tmp_path: Path, pydoc_jsonl: Path, spm_model: Path) -> str:
    config = PreprocessConfig(
        inputs=[str(pydoc_jsonl)],
        output_prefix=str(tmp_path / "pydoc"),
        tokenizer_model=str(spm_model),
        append_eod=True,
    )
    return preprocess(config, log=lambda _line: None).outputs["text"]


def _flip_document(prefix: str, doc: int, value: int = 65535) -> None:
    """Overwrite every token of document ``doc`` with ``value`` (bytes flipped inside the ``.bin``)."""
    ds = IndexedDataset(prefix)
    first, last = int(ds.document_indices[doc]), int(ds.document_indices[doc + 1])
    start = int(ds.sequence_pointers[first])
    end = int(ds.sequence_pointers[last - 1]) + int(ds.sequence_lengths[last - 1]) * ds.dtype.itemsize
    ds.close()
    with open(prefix + ".bin", "r+b") as f:
        f.seek(start)
        f.write(np.full((end - start) // 2, value, dtype="<u2").tobytes())


def _train_dataset(prefix: str, tokenizer, tmp_path: Path):
    cfg = build_config(
        {
            "model.size": "glm-tiny",
            "data.data_path": [prefix],
            "data.seq_length": 64,
            "data.split": "1",
            "data.cache_dir": str(tmp_path / "cache"),
            "training.train_iters": 4,
            "training.micro_batch_size": 2,
            "training.global_batch_size": 2,
        }
    )
    return build_pretraining_datasets(cfg, tokenizer)[0]


def test_out_of_vocabulary_ids_name_the_dataset_and_document(tmp_path, pydoc_jsonl, spm_model, glm_tokenizer):
    prefix = _dataset(tmp_path, pydoc_jsonl, spm_model)
    _flip_document(prefix, 5)
    train = _train_dataset(prefix, glm_tokenizer, tmp_path)
    with pytest.raises(DataError) as info:
        for i in range(len(train.windows)):
            train[i]
    assert str(info.value).startswith(f"{prefix}.bin: document 5 holds token id 65535 at token ")
    assert str(info.value).endswith(
        f"outside the tokenizer's {glm_tokenizer.vocab_size} ids; the file is corrupt "
        f"or was made with another tokenizer (preprocess again)"
    )


def test_dataset_of_another_tokenizer_is_refused_on_open(tmp_path, pydoc_jsonl, spm_model):
    prefix = _dataset(tmp_path, pydoc_jsonl, spm_model)
    meta = read_dataset_meta(prefix)
    assert meta is not None and 3000 < meta["max_token_id"] < meta["vocab_size"]
    with pytest.raises(
        DataError,
        match=rf"token ids go up to {meta['max_token_id']} .* but this run's tokenizer "
        r"has 1000 ids",
    ):
        DocumentWindows(prefix, (0, 10), 64, cls_id=1, eos_id=2, vocab_size=1000, build_cache=False)
    assert dataset_fingerprint(prefix) == meta["fingerprint"]


@pytest.mark.parametrize(
    ("suffix", "action", "message"),
    [
        (".bin", "truncate", r"\.bin: data file is \d+ bytes but .* points to \d+ bytes"),
        (".idx", "truncate", r"\.idx: index is \d+ bytes but its header"),
        (".idx", "magic", r"\.idx: not a Megatron index file"),
    ],
)
def test_truncated_or_corrupt_files(tmp_path, pydoc_jsonl, spm_model, suffix, action, message):
    prefix = _dataset(tmp_path, pydoc_jsonl, spm_model)
    path = Path(prefix + suffix)
    if action == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 10])
        (tmp_path / "pydoc_text_document.meta.json").unlink()  # the sidecar would name the size mismatch first
    else:
        with path.open("r+b") as f:
            f.write(b"NOTMMIDX!")
    with pytest.raises(DataError, match=message):
        IndexedDataset(prefix)


def test_sidecar_of_other_files_is_refused(tmp_path, pydoc_jsonl, spm_model):
    prefix = _dataset(tmp_path, pydoc_jsonl, spm_model)
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"\.meta\.json: records \.bin/\.idx sizes \d+/\d+ but the files have"):
        read_dataset_meta(prefix)


@pytest.mark.slow
def test_flipped_bytes_fail_under_tensor_parallelism(tiny_corpus, tmp_path):
    """TP=2 used to finish 'successfully', the vocab-parallel embedding treating bad ids as another shard's."""
    src = Path(tiny_corpus["data_path"])
    prefix = str(tmp_path / src.name)
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(str(src) + suffix, prefix + suffix)
    ds = IndexedDataset(prefix)
    docs = ds.num_documents
    ds.close()
    for doc in range(0, docs, 2):
        _flip_document(prefix, doc, 60000)
    corpus = {**tiny_corpus, "data_path": prefix}
    proc = launch(
        train_args(
            corpus,
            "--train-iters",
            "3",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "2",
            "--tensor-model-parallel-size",
            "2",
        ),
        nproc=2,
        check=False,
        timeout=600,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr[-3000:]
    assert all(f"{prefix}.bin: document " in line and "holds token id 60000" in line for line in errors), errors
    assert "Traceback" not in proc.stderr.split("error: ")[0][-2000:], proc.stderr[-3000:]
