"""GLMTokenizer, sentencepiece training and the tokenizer tools."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from megatron_glm.data.corpus import pydoc_documents
from megatron_glm.data.tokenizer import COMMAND_TOKENS, GLMTokenizer
from megatron_glm.data.tokenizer_training import split_long_text, train_sentencepiece
from megatron_glm.errors import DataError

from .conftest import REPO_ROOT

HARD_TEXT = "  Tabs\tand\r\nnewlines\n\n\nkept;  中文：你好，世界！ emoji 🦙 ünïcödé  trailing  "


def test_command_tokens_follow_base_vocab(glm_tokenizer):
    tok = glm_tokenizer
    base = tok.base_vocab_size
    assert base == 4000
    expected = {stem: base + i for i, (stem, _) in enumerate(COMMAND_TOKENS)}
    assert tok.command_tokens == expected
    ids = [getattr(tok, f"{stem}_id") for stem, _ in COMMAND_TOKENS]
    assert ids == list(range(base, base + 11))
    assert len(set(ids)) == 11 and tok.gmask_id != tok.eop_id and tok.pad_id != tok.eos_id
    assert tok.vocab_size == len(tok) == 4011
    assert [tok.id_to_token(i) for i in ids] == [text for _, text in COMMAND_TOKENS]
    assert tok.token_to_id("[sMASK]") == tok.smask_id


def test_padded_vocab_size(glm_tokenizer):
    assert glm_tokenizer.padded_vocab_size() == 4096
    assert glm_tokenizer.padded_vocab_size(tp_size=2) == 4096
    assert glm_tokenizer.padded_vocab_size(tp_size=3) == 4224  # multiple of 384
    assert glm_tokenizer.padded_vocab_size(tp_size=1, divisible_by=1) == 4011
    with pytest.raises(ValueError):
        glm_tokenizer.padded_vocab_size(tp_size=0)


def test_exact_round_trip(glm_tokenizer):
    texts = [text for _, text in pydoc_documents()] + [HARD_TEXT, "", " ", "\n"]
    for text in texts:
        ids = glm_tokenizer.encode(text)
        assert all(0 <= i < glm_tokenizer.base_vocab_size for i in ids)
        assert glm_tokenizer.decode(ids) == text
        assert glm_tokenizer.decode(np.asarray(ids, dtype=np.uint16)) == text


def test_sentences_decode_to_concatenation(glm_tokenizer):
    """No dummy prefix: the tokens of consecutive pieces decode to the concatenated text."""
    pieces = ["The first sentence.", " The second one!", "\n\nA new paragraph: 你好。"]
    ids = [i for piece in pieces for i in glm_tokenizer.encode(piece)]
    assert glm_tokenizer.decode(ids) == "".join(pieces)


def test_special_tokens_in_text(glm_tokenizer):
    tok = glm_tokenizer
    prompt = "The capital is [MASK]. Continue: [gMASK][sop]"
    ids = tok.encode(prompt)
    assert ids.count(tok.mask_id) == 1 and ids[-2:] == [tok.gmask_id, tok.sop_id]
    assert ids[: ids.index(tok.mask_id)] == tok.encode("The capital is ")
    assert tok.decode(ids) == prompt
    plain = tok.encode(prompt, allow_special=False)
    assert not set(plain) & set(tok.command_tokens.values())
    assert tok.decode(plain) == prompt
    # Brackets that are no command token stay text.
    assert tok.encode("[mask] [MASK ]") == tok.encode("[mask] [MASK ]", allow_special=False)


def test_decode_rejects_unknown_ids(glm_tokenizer):
    with pytest.raises(ValueError, match=r"token id 4011 is outside the vocabulary \[0, 4011\)"):
        glm_tokenizer.decode([1, 4011])
    with pytest.raises(ValueError):
        glm_tokenizer.id_to_token(-1)
    with pytest.raises(KeyError):
        glm_tokenizer.token_to_id("no such piece here")


def test_pickle(glm_tokenizer):
    clone = pickle.loads(pickle.dumps(glm_tokenizer))
    assert clone.encode(HARD_TEXT) == glm_tokenizer.encode(HARD_TEXT)
    assert clone.command_tokens == glm_tokenizer.command_tokens


def test_bad_model_files(tmp_path):
    with pytest.raises(DataError, match=r"missing\.model: tokenizer model not found"):
        GLMTokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is no protobuf \x00\xff")
    with pytest.raises(DataError, match=r"garbage\.model: not a sentencepiece model"):
        GLMTokenizer(garbage)


def test_cog_pretrain_model(cog_pretrain_model):
    """GLM's own Chinese 50,000-piece model: command tokens after it, [gMASK] and [eop] distinct."""
    tok = GLMTokenizer(cog_pretrain_model)
    assert tok.base_vocab_size == 50000
    assert (tok.mask_id, tok.gmask_id, tok.eop_id) == (50003, 50005, 50007)
    assert tok.padded_vocab_size() == 50048
    ids = tok.encode("中国的首都是[MASK]。[gMASK]")
    assert ids.count(tok.mask_id) == 1 and ids[-1] == tok.gmask_id
    assert tok.decode(ids) == "中国的首都是[MASK]。[gMASK]"


# -- training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [16, 50, 4192])
def test_split_long_text(limit):
    text = ("word " * 30 + "\n") * 5 + "中文字符" * 40 + "x" * 100 + "\n\nend"
    pieces = list(split_long_text(text, limit))
    assert "".join(pieces) == text
    assert all(0 < len(p.encode("utf-8")) <= limit for p in pieces)
    if limit == 4192:
        assert pieces == [text]


def test_long_lines_are_split_not_dropped(tmp_path):
    """sentencepiece drops sentences over max_sentence_length; training must still see the text."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    corpus = tmp_path / "long.jsonl"
    with open(corpus, "w") as out:
        for _ in range(4):
            text = " ".join(rng.choice(words, size=3000))  # ~17 KB on one line
            out.write(json.dumps({"text": text}) + "\n")
    stats = train_sentencepiece([str(corpus)], str(tmp_path / "m"), 300, max_sentence_length=4192)
    assert stats.documents == 4 and stats.split_documents == 4 and stats.sentences >= 16
    tok = GLMTokenizer(tmp_path / "m.model")
    pieces = {tok.id_to_token(i) for i in range(tok.base_vocab_size)}
    assert "epsilon" in pieces or "▁epsilon" in pieces  # learned from the long lines
    assert len(tok.encode(" epsilon")) <= 2


def test_unigram_text_input(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(text.replace("\n", " ") + "\n" for _, text in pydoc_documents()[:20]))
    train_sentencepiece([str(corpus)], str(tmp_path / "uni"), 800, model_type="unigram", input_format="text")
    tok = GLMTokenizer(tmp_path / "uni.model")
    assert tok.base_vocab_size == 800
    assert tok.decode(tok.encode(HARD_TEXT)) == HARD_TEXT
    assert (tmp_path / "uni.vocab").read_text().count("\n") == 800


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_tools_export_and_train(tmp_path):
    corpus = tmp_path / "pydoc.jsonl"
    result = run_tool("tools/export_pydoc_corpus.py", "--output", str(corpus))
    assert result.returncode == 0, result.stderr
    lines = corpus.read_text().splitlines()
    assert len(lines) == len(pydoc_documents()) and json.loads(lines[0])["text"]
    result = run_tool(
        "tools/train_tokenizer.py",
        "--input",
        str(corpus),
        "--vocab-size",
        "1000",
        "--model-prefix",
        str(tmp_path / "tok"),
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "vocab 1000 + 11 command tokens = 1011 (padded 1024)" in result.stdout
    assert GLMTokenizer(tmp_path / "tok.model").vocab_size == 1011


def test_tool_errors_are_one_line(tmp_path):
    result = run_tool(
        "tools/train_tokenizer.py",
        "--input",
        str(tmp_path / "nothing*.jsonl"),
        "--vocab-size",
        "100",
        "--model-prefix",
        str(tmp_path / "x"),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --input {tmp_path}/nothing*.jsonl: no file matches this pattern"
    result = run_tool(
        "tools/train_tokenizer.py",
        "--input",
        str(REPO_ROOT / "pyproject.toml"),
        "--vocab-size",
        "8",
        "--model-prefix",
        str(tmp_path / "x"),
    )
    assert result.returncode == 2 and result.stderr.startswith("error: --vocab-size 8")
