"""Shared fixtures for the data tests (tokenizer, indexed datasets, preprocessing, samplers).

Session-scoped, built once from the embedded pydoc corpus (no download):

- ``pydoc_jsonl``: path of a JSONL file, one ``{"id", "text"}`` object per pydoc topic (79 documents).
- ``spm_model``: path of a 4,000-piece BPE sentencepiece model trained on it with the project's
  round-trip settings (identity normalisation, byte fallback, no dummy prefix).
- ``glm_tokenizer``: a :class:`GLMTokenizer` on ``spm_model`` (vocab 4,011, padded 4,096).
- ``pydoc_dataset``: ``{"sentence": prefix, "document": prefix}``: the corpus preprocessed with
  ``glm_tokenizer`` (EOD appended), one dataset with a sequence per sentence and one with a sequence
  per document. Open with ``IndexedDataset(prefix)``.
- ``cog_pretrain_model``: GLM's own 50,000-piece Chinese model from the SwissArmyTransformer wheel,
  found through ``$GLM_COG_PRETRAIN_MODEL`` (skipped when that variable is unset; fails when it
  names a missing file).

Function-scoped:

- ``make_indexed_dataset(documents, dtype=np.uint16, name="ds")``: writes ``documents`` (a list of
  documents, each a list of sequences, each a list of token ids) under ``tmp_path`` and returns the
  opened :class:`IndexedDataset` (its ``.prefix`` is the path prefix).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.data.corpus import pydoc_documents, write_jsonl
from megatron_glm.data.indexed_builder import IndexedDatasetBuilder
from megatron_glm.data.indexed_dataset import IndexedDataset
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.data.tokenizer_training import train_sentencepiece

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_documents(prefix: str | os.PathLike[str], documents: Sequence[Sequence[Sequence[int]]], dtype=np.uint16):
    """Write ``documents`` (documents of sequences of ids) as ``{prefix}.bin/.idx`` with our builder."""
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for document in documents:
            for sequence in document:
                builder.add_item(np.asarray(sequence, dtype=np.int64))
            builder.end_document()
    return os.fspath(prefix)


@pytest.fixture(scope="session")
def pydoc_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "pydoc.jsonl"
    write_jsonl(path, [{"id": topic, "text": text} for topic, text in pydoc_documents()])
    return path


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory: pytest.TempPathFactory, pydoc_jsonl: Path) -> Path:
    prefix = tmp_path_factory.mktemp("tokenizer") / "pydoc_bpe"
    train_sentencepiece([str(pydoc_jsonl)], str(prefix), 4000, model_type="bpe", num_threads=1)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def glm_tokenizer(spm_model: Path) -> GLMTokenizer:
    return GLMTokenizer(spm_model)


@pytest.fixture(scope="session")
def pydoc_dataset(tmp_path_factory: pytest.TempPathFactory, pydoc_jsonl: Path, spm_model: Path) -> dict[str, str]:
    from megatron_glm.data.preprocess import PreprocessConfig, preprocess

    out = tmp_path_factory.mktemp("pydoc_dataset")
    prefixes = {}
    for level, split in (("sentence", True), ("document", False)):
        config = PreprocessConfig(
            inputs=[str(pydoc_jsonl)],
            output_prefix=str(out / "pydoc"),
            tokenizer_model=str(spm_model),
            split_sentences=split,
            append_eod=True,
            workers=1,
        )
        summary = preprocess(config, log=lambda _line: None)
        prefixes[level] = summary.outputs["text"]
    return prefixes


@pytest.fixture
def make_indexed_dataset(tmp_path: Path) -> Callable[..., IndexedDataset]:
    def make(documents: Sequence[Sequence[Sequence[int]]], dtype=np.uint16, name: str = "ds") -> IndexedDataset:
        return IndexedDataset(write_documents(tmp_path / name, documents, dtype))

    return make


@pytest.fixture(scope="session")
def cog_pretrain_model() -> Path:
    path = os.environ.get("GLM_COG_PRETRAIN_MODEL")
    if not path:
        pytest.skip("GLM_COG_PRETRAIN_MODEL is not set (cog-pretrain.model from the SwissArmyTransformer wheel)")
    if not os.path.isfile(path):
        pytest.fail(f"GLM_COG_PRETRAIN_MODEL={path} does not exist")
    return Path(path)
