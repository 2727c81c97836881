"""Training a sentencepiece model for :class:`~megatron_glm.data.tokenizer.GLMTokenizer`.

Defaults give exact round trips: identity normalisation, whitespace kept as it is, no dummy prefix
(so the tokens of consecutive sentences decode to the concatenated text) and byte fallback (no
unknown characters). sentencepiece's own ``<s>``/``</s>`` are disabled: GLM appends its command
tokens after the vocabulary. The corpus is streamed; texts longer than sentencepiece's
``max_sentence_length`` (which it would silently drop) are split at line breaks, then at spaces,
then at character boundaries.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import sentencepiece as spm

from megatron_glm.data.corpus import expand_inputs
from megatron_glm.data.sources import iter_texts
from megatron_glm.errors import DataError

__all__ = ["TrainerStats", "split_long_text", "train_sentencepiece"]

MODEL_TYPES = ("bpe", "unigram")

#: The lowest ``character_coverage`` sentencepiece accepts (an opaque internal assertion below it).
MIN_COVERAGE = 0.98

_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def explain_failure(message: str, character_coverage: float) -> str:
    """sentencepiece's error as one line in our flag names (``--vocab-size``, ``--character-coverage``), without
    its source location."""
    if found := _TOO_SMALL.search(message):
        return (
            f"--vocab-size {found[1]} is below the {found[2]} pieces that --character-coverage {character_coverage} "
            f"needs (the characters it covers plus byte and special pieces): raise --vocab-size to at least "
            f"{found[2]}, or lower --character-coverage (not below {MIN_COVERAGE})"
        )
    if found := _TOO_LARGE.search(message):
        return f"--vocab-size {found[1]} is more pieces than this corpus yields: use at most {found[2]}, or more text"
    last = message.strip().splitlines()[-1] if message.strip() else "unknown error"
    last = re.sub(r"^[A-Z_]+: \S+\(\d+\) \[.*?\] ?", "", last)  # "INTERNAL: src/x.cc(94) [check] "
    return re.sub(r"--(\w+)", lambda m: "--" + m[1].replace("_", "-"), last) or message.strip()


def _cut(text: str, limit: int) -> int:
    """Largest character count whose UTF-8 encoding fits ``limit`` bytes (at least 1)."""
    lo, hi = 1, min(len(text), limit)
    if len(text[:hi].encode("utf-8")) <= limit:
        return hi
    while lo < hi:  # binary search on characters
        mid = (lo + hi + 1) // 2
        if len(text[:mid].encode("utf-8")) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_long_text(text: str, limit: int) -> Iterator[str]:
    """Pieces of ``text``, each at most ``limit`` UTF-8 bytes, that concatenate back to ``text``.

    Lines (with their newline) are packed greedily; a longer line is cut after its last space that
    fits, or at a character boundary when it has none.
    """
    if len(text.encode("utf-8")) <= limit:
        yield text
        return
    pending = ""
    pending_bytes = 0
    for line in text.splitlines(keepends=True):
        size = len(line.encode("utf-8"))
        if pending_bytes + size <= limit:
            pending += line
            pending_bytes += size
            continue
        if pending:
            yield pending
            pending, pending_bytes = "", 0
        while size > limit:
            cut = _cut(line, limit)
            space = line.rfind(" ", 0, cut)
            if space > 0:
                cut = space + 1
            yield line[:cut]
            line = line[cut:]
            size = len(line.encode("utf-8"))
        pending, pending_bytes = line, size
    if pending:
        yield pending


@dataclass
class TrainerStats:
    """What training read."""

    documents: int = 0
    sentences: int = 0
    bytes: int = 0
    split_documents: int = 0
    files: list[str] = field(default_factory=list)

    @classmethod
    def for_inputs(cls, inputs: Sequence[str], output: str, label: str) -> TrainerStats:
        """Empty stats over the expanded ``inputs``, once the directory of ``output`` (named ``label`` in the
        error) is known to exist."""
        directory = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(directory):
            raise DataError(f"{label}: directory {directory} does not exist")
        return cls(files=expand_inputs(inputs))

    def check_read(self) -> None:
        """Training read no usable text at all: an error."""
        if self.documents == 0:
            raise DataError(f"--input: no usable text in {', '.join(self.files)}")


def _sentences(texts: Iterable[str], limit: int, stats: TrainerStats) -> Iterator[str]:
    for text in texts:
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        pieces = 0
        for piece in split_long_text(text, limit):
            pieces += 1
            yield piece
        stats.sentences += pieces
        stats.split_documents += pieces > 1


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    input_format: str = "auto",
    json_key: str = "text",
    max_sentence_length: int = 4192,
    input_sentence_size: int = 0,
    byte_fallback: bool = True,
    add_dummy_prefix: bool = False,
    num_threads: int | None = None,
    seed: int = 0,
) -> TrainerStats:
    """Train ``{model_prefix}.model`` (and a readable ``{model_prefix}.vocab``) from ``inputs``.

    ``input_sentence_size`` > 0 samples that many sentences (bounded memory for huge corpora);
    0 uses all of them. Outputs are written atomically.
    """
    if model_type not in MODEL_TYPES:
        raise DataError(f"--model-type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 16:
        raise DataError(f"--vocab-size {vocab_size}: expected at least 16")
    if not MIN_COVERAGE <= character_coverage <= 1.0:
        raise DataError(
            f"--character-coverage {character_coverage}: expected a value in [{MIN_COVERAGE}, 1] (sentencepiece's "
            f"range; the characters it leaves out are spelled in byte pieces)"
        )
    if max_sentence_length < 16:
        raise DataError(f"--max-sentence-length {max_sentence_length}: expected at least 16 bytes")
    stats = TrainerStats.for_inputs(inputs, model_prefix, f"--model-prefix {model_prefix}")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_sentences(iter_texts(stats.files, input_format, json_key), max_sentence_length, stats),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=add_dummy_prefix,
            byte_fallback=byte_fallback,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            bos_id=-1,
            eos_id=-1,
            unk_id=0,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            hard_vocab_limit=True,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise DataError(f"sentencepiece training failed: {explain_failure(str(exc), character_coverage)}") from None
    stats.check_read()
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{processor.IdToPiece(i)}\t{processor.GetScore(i)}\n" for i in range(processor.GetPieceSize()))
    _write_atomic(f"{model_prefix}.model", model.getvalue())
    _write_atomic(f"{model_prefix}.vocab", vocab.encode("utf-8"))
    return stats


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
