"""Tokenizers beyond sentencepiece: a byte-level BPE tokenizer.json (trained here), a folder holding one, a
tiktoken BPE file; preprocessing with them gives tokenizers' own ids; missing command tokens are errors."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import regex

from megatron_glm.data import preprocess_encode
from megatron_glm.data.bpe_training import BPE_SPECIAL_TOKENS, train_byte_bpe
from megatron_glm.data.corpus import pydoc_documents, write_jsonl
from megatron_glm.data.indexed_dataset import IndexedDataset
from megatron_glm.data.preprocess import PreprocessConfig, preprocess
from megatron_glm.data.tiktoken_file import GLM4_PATTERN, GLM4_SPECIAL_TOKENS, byte_to_unicode
from megatron_glm.data.tokenizer import (
    GLMTokenizer,
    MissingTokenError,
    open_tokenizer,
    tokenizer_fingerprint,
    tokenizer_kind,
)
from megatron_glm.data.tokenizer_json import JsonTokenizer
from megatron_glm.errors import DataError
from megatron_glm.tokens import CommandTokens

from .conftest import REPO_ROOT

tokenizers = pytest.importorskip("tokenizers")

HARD_TEXT = "  Tabs\tand\r\nnewlines\n\n\nkept;  中文：你好，世界！ emoji 🦙 ünïcödé  trailing  I'LL 12345"
#: A document that spells special tokens: preprocessing keeps them as text.
SPELLED = "Write [MASK] or <|endoftext|> or <sop> in a document: they stay text."


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory: pytest.TempPathFactory, pydoc_jsonl: Path) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "pydoc_bpe.json"
    train_byte_bpe([str(pydoc_jsonl)], str(path), 1000)
    return path


def _edited(src: Path, dst: Path, drop: str) -> Path:
    """``src`` without the added token ``drop``."""
    data = json.loads(src.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != drop]
    dst.write_text(json.dumps(data), encoding="utf-8")
    return dst


def test_trained_bpe_loads_and_round_trips(bpe_json: Path) -> None:
    tok = open_tokenizer(bpe_json)
    assert isinstance(tok, JsonTokenizer) and tok.kind == "tokenizer.json" and tok.byte_level
    assert tok.base_vocab_size == 1000 and tok.vocab_size == 1000 + len(BPE_SPECIAL_TOKENS)
    assert tok.padded_vocab_size() == 1024
    # Command tokens are the tokenizer's own special tokens, after the learned vocabulary (GLM-4's layout).
    assert tok.eos_id == 1000 and tok.mask_id == 1001 and tok.gmask_id == 1002 and tok.smask_id == 1003
    assert (tok.sop_id, tok.eop_id, tok.pad_id, tok.cls_id, tok.dblock_id) == (1004, 1005, 1010, 1011, 1012)
    assert tok.token_to_id("<sop>") == tok.token_to_id("[sop]") == tok.sop_id
    assert tok.command_token_ids["[eos]"] == tok.eos_id and tok.id_to_token(tok.eop_id) == "<eop>"
    for text in [t for _, t in pydoc_documents()] + [HARD_TEXT, "", " ", "\n"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.base_vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(np.asarray(ids, dtype=np.uint16)) == text
        # Byte-level: each token's bytes concatenate to the text's UTF-8 (tokens may split a character).
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    prompt = "The capital is [MASK]. Continue: [gMASK]<sop>"
    ids = tok.encode(prompt)
    assert ids.count(tok.mask_id) == 1 and ids[-2:] == [tok.gmask_id, tok.sop_id]
    assert tok.decode(ids) == prompt
    plain = tok.encode(prompt, allow_special=False)
    assert not set(plain) & set(tok.command_tokens.values()) and tok.decode(plain) == prompt
    with pytest.raises(ValueError, match=r"token id 1013 is outside the vocabulary \[0, 1013\)"):
        tok.decode([1, 1013])
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(HARD_TEXT) == tok.encode(HARD_TEXT) and copy.command_tokens == tok.command_tokens


def test_folder_and_fingerprint(bpe_json: Path, spm_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(bpe_json, folder / "tokenizer.json")
    assert tokenizer_kind(folder) == "tokenizer.json" and tokenizer_kind(spm_model) == "sentencepiece"
    assert open_tokenizer(folder).encode(HARD_TEXT) == open_tokenizer(bpe_json).encode(HARD_TEXT)
    digest = hashlib.sha256(bpe_json.read_bytes()).hexdigest()
    assert tokenizer_fingerprint(folder) == tokenizer_fingerprint(bpe_json) == digest
    assert tokenizer_fingerprint(spm_model) == hashlib.sha256(spm_model.read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r"must hold tokenizer.json"):
        open_tokenizer(tmp_path)


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_gives_tokenizers_own_ids(bpe_json: Path, tmp_path: Path, workers: int) -> None:
    """Acceptance: tools/preprocess_data.py with a tokenizer.json stores, for every document, the ids of
    tokenizers' own encoder (no special tokens added; special-token text in the corpus stays text)."""
    docs = [t for _, t in pydoc_documents()] + [HARD_TEXT, SPELLED]
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"text": t} for t in docs])
    proc = subprocess.run(
        [
            sys.executable,
            "tools/preprocess_data.py",
            "--input",
            str(corpus),
            "--tokenizer-model",
            str(bpe_json),
            "--output-prefix",
            str(tmp_path / "out"),
            "--workers",
            str(workers),
            "--chunk-mb",
            "0.05",
            "--append-eod",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.num_documents == len(docs) and ds.dtype == np.uint16
    reference = tokenizers.Tokenizer.from_file(str(bpe_json))
    reference.encode_special_tokens = True  # what a corpus means by "[MASK]" is the text
    eos = reference.token_to_id("<|endoftext|>")
    for k, text in enumerate(docs):
        (stored,) = ds.document(k)
        assert stored.tolist() == [*reference.encode(text, add_special_tokens=False).ids, eos], k
    # Without the flag, tokenizers maps the spelled special tokens: the stored document differs exactly there.
    spelled = reference.encode(SPELLED, add_special_tokens=False).ids
    reference.encode_special_tokens = False
    assert reference.encode(SPELLED, add_special_tokens=False).ids != spelled


def test_huge_documents_encode_in_pieces_with_the_same_ids(bpe_json: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(preprocess_encode, "PIECE_CHARS", 300)
    monkeypatch.setattr(preprocess_encode, "BATCH_CHARS", 700)
    docs = [t for _, t in pydoc_documents()[:6]] + [HARD_TEXT * 40]
    corpus = tmp_path / "big.jsonl"
    write_jsonl(corpus, [{"text": t} for t in docs])
    encoder = preprocess_encode.WorkerEncoder.open(str(bpe_json))
    assert encoder.splittable
    summary = preprocess(
        PreprocessConfig(inputs=[str(corpus)], output_prefix=str(tmp_path / "big"), tokenizer_model=str(bpe_json)),
        log=lambda _line: None,
    )
    ds = IndexedDataset(summary.outputs["text"])
    reference = tokenizers.Tokenizer.from_file(str(bpe_json))
    for k, text in enumerate(docs):
        assert ds.document(k)[0].tolist() == reference.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("token", ["<sop>", "[gMASK]", "<|endoftext|>"])
def test_missing_command_token_is_one_line_error(bpe_json: Path, tmp_path: Path, token: str) -> None:
    broken = _edited(bpe_json, tmp_path / "broken.json", token)
    with pytest.raises(DataError, match=rf"{broken}: no GLM command token .*{regex.escape(token)}"):
        open_tokenizer(broken)
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, [{"text": "hello"}])
    proc = subprocess.run(
        [
            sys.executable,
            "tools/preprocess_data.py",
            "--input",
            str(corpus),
            "--tokenizer-model",
            str(broken),
            "--output-prefix",
            str(tmp_path / "out"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken}: no GLM command token") and token in lines[0]


def test_optional_command_tokens_fail_only_where_used(bpe_json: Path, tmp_path: Path) -> None:
    no_cls = open_tokenizer(_edited(bpe_json, tmp_path / "no_cls.json", "[CLS]"))
    assert no_cls.mask_id == 1001  # loads: only what needs [CLS] fails
    with pytest.raises(MissingTokenError, match=r"no_cls.json: the tokenizer has no \[CLS\] token"):
        _ = no_cls.cls_id
    with pytest.raises(DataError, match=r"no \[CLS\] token"):
        CommandTokens.from_tokenizer(no_cls)
    no_dblock = open_tokenizer(_edited(bpe_json, tmp_path / "no_dblock.json", "[dBLOCK]"))
    assert CommandTokens.from_tokenizer(no_dblock).dblock == -1  # only block masking writes it (checked there)
    no_pad = open_tokenizer(_edited(bpe_json, tmp_path / "no_pad.json", "[pad]"))
    assert no_pad.pad_id == no_pad.eos_id  # GLM-4 pads with <|endoftext|>


def _write_tiktoken(bpe_json: Path, path: Path) -> dict[bytes, int]:
    """The learned vocabulary of ``bpe_json`` as a tiktoken file (ranks in merge order)."""
    inverse = {char: byte for byte, char in byte_to_unicode().items()}
    vocab = tokenizers.Tokenizer.from_file(str(bpe_json)).get_vocab(with_added_tokens=False)
    ranks = {bytes(inverse[c] for c in piece): rank for rank, piece in enumerate(sorted(vocab, key=vocab.get))}
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()), encoding="ascii")
    return ranks


def _tiktoken_reference(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm, written out: split by the pattern, then merge the lowest-ranked adjacent pair."""
    out: list[int] = []
    for match in regex.finditer(GLM4_PATTERN, text):
        parts = [bytes([b]) for b in match.group().encode("utf-8")]
        while len(parts) > 1:
            pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(itertools.pairwise(parts)) if a + b in ranks]
            if not pairs:
                break
            i = min(pairs)[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ranks[p] for p in parts)
    return out


def test_tiktoken_file_encodes_as_tiktoken(bpe_json: Path, tmp_path: Path) -> None:
    ranks = _write_tiktoken(bpe_json, tmp_path / "tokenizer.model")
    assert tokenizer_kind(tmp_path / "tokenizer.model") == "tiktoken" and tokenizer_kind(tmp_path) == "tiktoken"
    tok = open_tokenizer(tmp_path)
    assert tok.kind == "tiktoken" and tok.vocab_size == len(ranks) + len(GLM4_SPECIAL_TOKENS)
    assert (tok.eos_id, tok.mask_id, tok.gmask_id, tok.sop_id) == (1000, 1001, 1002, 1004)  # GLM-4's numbering
    for text in [t for _, t in pydoc_documents()[:25]] + [HARD_TEXT, SPELLED]:
        ids = tok.encode(text, allow_special=False)
        assert ids == _tiktoken_reference(ranks, text)
        assert tok.decode(ids) == text
    assert tok.encode("x<sop>y")[1] == tok.sop_id
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.kind == "tiktoken" and copy.encode(HARD_TEXT) == tok.encode(HARD_TEXT)
    # A tokenizer_config.json next to the file names the special tokens (as GLM-4-9B's does).
    added = {str(1000 + k): {"content": t} for k, t in enumerate(BPE_SPECIAL_TOKENS)}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    assert open_tokenizer(tmp_path).cls_id == 1011


def test_tiktoken_library_agrees(bpe_json: Path, tmp_path: Path) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    ranks = _write_tiktoken(bpe_json, tmp_path / "tokenizer.model")
    specials = {t: len(ranks) + k for k, t in enumerate(GLM4_SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    tok = open_tokenizer(tmp_path / "tokenizer.model")
    for text in [t for _, t in pydoc_documents()] + [HARD_TEXT, SPELLED]:
        assert tok.encode(text, allow_special=False) == enc.encode(text, disallowed_special=())
        assert tok.encode(text) == enc.encode(text, allowed_special="all")


def test_bad_tiktoken_file_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.model"
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    bad.write_text("\n".join([*lines[:10], "not-a-rank-line", *lines[10:]]) + "\n")
    with pytest.raises(DataError, match=r"bad.model:11: expected 'base64-token rank'"):
        open_tokenizer(bad)
    bad.write_text("\n".join(lines[:200]) + "\n")
    with pytest.raises(DataError, match=r"byte 0xc8 has no rank"):
        open_tokenizer(bad)


def test_sentencepiece_token_bytes(glm_tokenizer: GLMTokenizer) -> None:
    for text in [HARD_TEXT, "plain words", "[MASK] x"]:
        ids = glm_tokenizer.encode(text)
        assert b"".join(glm_tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_block_masking_needs_dblock(bpe_json: Path, tmp_path: Path, make_indexed_dataset) -> None:
    from megatron_glm.data.loader import build_pretraining_datasets

    from .test_loader import config
    from .test_samples import random_documents

    no_dblock = open_tokenizer(_edited(bpe_json, tmp_path / "no_dblock.json", "[dBLOCK]"))
    prefix = make_indexed_dataset(random_documents(0, 50, max_sentences=4)).prefix
    cfg = config(prefix, tmp_path, block_mask_prob=0.1)
    cfg.data.tokenizer_model = str(tmp_path / "no_dblock.json")
    with pytest.raises(DataError, match=r"no_dblock.json: the tokenizer has no \[dBLOCK\] token"):
        build_pretraining_datasets(cfg, no_dblock)
    cfg.data.objective.block_mask_prob = 0.0
    assert build_pretraining_datasets(cfg, no_dblock)[0] is not None  # not needed: no error
