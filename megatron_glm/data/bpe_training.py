"""Training a byte-level BPE ``tokenizer.json`` (GLM-4's kind of tokenizer) with the ``tokenizers`` library.

No normalisation; GLM-4's pre-tokenization pattern, then bytes as printable characters (every text encodes,
``decode(encode(text)) == text``). The special tokens (:data:`BPE_SPECIAL_TOKENS`: GLM-4's spellings plus
``[pad]``, ``[CLS]`` and ``[dBLOCK]``, which the blank-infilling objective uses) take the ids after the
learned vocabulary, as in GLM-4's releases. The corpus is streamed; the output is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

from megatron_glm.data.sources import iter_texts
from megatron_glm.data.tiktoken_file import GLM4_PATTERN, GLM4_SPECIAL_TOKENS
from megatron_glm.data.tokenizer_training import TrainerStats
from megatron_glm.errors import DataError

__all__ = ["BPE_SPECIAL_TOKENS", "train_byte_bpe"]

#: GLM-4's first ten special tokens, then the command tokens only our objectives use.
BPE_SPECIAL_TOKENS: tuple[str, ...] = (*GLM4_SPECIAL_TOKENS[:10], "[pad]", "[CLS]", "[dBLOCK]")


def _counted(texts: Iterable[str], stats: TrainerStats) -> Iterator[str]:
    for text in texts:
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        yield text


def train_byte_bpe(
    inputs: Sequence[str],
    output: str,
    vocab_size: int,
    *,
    input_format: str = "auto",
    json_key: str = "text",
    min_frequency: int = 2,
    special_tokens: Sequence[str] = BPE_SPECIAL_TOKENS,
) -> TrainerStats:
    """Train a byte-level BPE of ``vocab_size`` learned tokens (the 256 bytes included; the special tokens
    come on top) on ``inputs`` and write it to ``output`` (a ``tokenizer.json``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 (256 bytes + 1 merge)")
    stats = TrainerStats.for_inputs(inputs, output, output)
    tokenizer = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_counted(iter_texts(stats.files, input_format, json_key), stats), trainer=trainer)
    stats.check_read()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        tokenizer.save(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return stats
