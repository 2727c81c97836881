"""A tiktoken BPE file (``base64-token rank`` a line; GLM-4-9B's ``tokenizer.model``) as a ``tokenizers`` BPE.

tiktoken's algorithm: split the text with a regular expression, then in each piece merge, again and again,
the adjacent pair of parts whose concatenation has the lowest rank (a piece that is itself a token is
that token). A byte-level BPE whose merges are every ``(left, right)`` split of every token into two
tokens, ordered by the rank of the token, with ``ignore_merges`` (a whole piece in the vocabulary is one
token), does the same (the conversion transformers applies to tiktoken files). The regular expression
and the special tokens are not in the file: GLM-4's are used (:data:`GLM4_PATTERN`,
:data:`GLM4_SPECIAL_TOKENS`, numbered after the ranks), or the ``added_tokens_decoder`` of a
``tokenizer_config.json`` next to the file.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from megatron_glm.errors import DataError

__all__ = ["GLM4_PATTERN", "GLM4_SPECIAL_TOKENS", "build_tiktoken_tokenizer", "looks_like_tiktoken", "read_ranks"]

#: GLM-4's pre-tokenization pattern (the one of its remote-code ``tokenization_chatglm.py``).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
#: GLM-4's special tokens, numbered from the number of ranks on.
GLM4_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)


def _line_ok(line: bytes) -> bool:
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def looks_like_tiktoken(path: str) -> bool:
    """Whether the first lines of ``path`` are ``base64 rank`` pairs (a sentencepiece model is binary)."""
    with open(path, "rb") as stream:
        head = stream.read(4096)
    lines = head.split(b"\n")[:-1] or [head]
    return bool(lines) and all(_line_ok(line) for line in lines[:8] if line.strip())


def read_ranks(path: str) -> dict[bytes, int]:
    """Token bytes -> rank; a malformed line or a repeated rank is a one-line error naming the line."""
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    with open(path, "rb") as stream:
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            if not _line_ok(line):
                raise DataError(f"{path}:{lineno}: expected 'base64-token rank' (a tiktoken BPE file)")
            token, rank = line.split()
            value = int(rank)
            if value in seen:
                raise DataError(f"{path}:{lineno}: rank {value} repeats")
            seen.add(value)
            ranks[base64.b64decode(token)] = value
    if not ranks:
        raise DataError(f"{path}: empty tiktoken file")
    if sorted(seen) != list(range(len(seen))):
        raise DataError(f"{path}: ranks are not 0..{len(seen) - 1} without gaps")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{path}: byte 0x{missing[0]:02x} has no rank (a byte-level BPE needs all 256 bytes)")
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _special_tokens(path: str, count: int) -> list[tuple[int, str]]:
    config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as stream:
                added = json.load(stream).get("added_tokens_decoder") or {}
            tokens = sorted((int(i), str(v["content"])) for i, v in added.items())
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"{config}: unreadable added_tokens_decoder ({exc})") from None
        if tokens:
            return tokens
    return [(count + k, text) for k, text in enumerate(GLM4_SPECIAL_TOKENS)]


def build_tiktoken_tokenizer(path: str) -> Any:
    """A ``tokenizers.Tokenizer`` encoding as tiktoken does with the ranks of ``path`` and GLM-4's pattern."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = read_ranks(path)
    table = byte_to_unicode()
    text = {token: "".join(table[b] for b in token) for token in ranks}
    vocab = {text[token]: rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text[left], text[right]))
    merges.sort()
    model = models.BPE(vocab, [(m[3], m[4]) for m in merges], fuse_unk=False, byte_fallback=False, ignore_merges=True)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    for token_id, content in _special_tokens(path, len(ranks)):
        if token_id != tokenizer.get_vocab_size(with_added_tokens=True):
            raise DataError(f"{path}: special token {content!r} has id {token_id}, expected the next free id")
        tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    return tokenizer
