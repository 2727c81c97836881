"""Train a sentencepiece tokenizer model for GLM from JSONL or plain-text corpora.

Example (the embedded pydoc corpus)::

    python tools/export_pydoc_corpus.py --output data/pydoc.jsonl
    python tools/train_tokenizer.py --input data/pydoc.jsonl --vocab-size 4000 --model-prefix data/pydoc_bpe

Writes ``{model-prefix}.model`` and ``{model-prefix}.vocab``; GLM's command tokens are appended after the
pieces when the model is loaded. ``--type bpe`` trains a byte-level BPE with the ``tokenizers`` library
instead (GLM-4's kind of tokenizer) and writes ``{model-prefix}.json`` (a ``tokenizer.json``) whose special
tokens are GLM-4's (``<|endoftext|>``, ``[MASK]``, ``[gMASK]``, ``[sMASK]``, ``<sop>``, ``<eop>``, chat roles)
plus ``[pad]``, ``[CLS]`` and ``[dBLOCK]``. Either file is a ``--tokenizer-model`` everywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.data.bpe_training import train_byte_bpe
from megatron_glm.data.tokenizer import open_tokenizer
from megatron_glm.data.tokenizer_training import MODEL_TYPES, train_sentencepiece
from megatron_glm.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL / text (plain, .gz, .zst) or Parquet file(s) or globs"
    )
    parser.add_argument(
        "--input-format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="auto (default): by extension, else by the first line; jsonl: one JSON object a line; text: one "
        "document a line",
    )
    parser.add_argument("--json-key", default="text", help="JSONL key holding the text (default: text)")
    parser.add_argument("--vocab-size", type=int, required=True, help="base pieces (command tokens come on top)")
    parser.add_argument(
        "--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab (--type bpe: PREFIX.json)"
    )
    parser.add_argument(
        "--type",
        choices=("sentencepiece", "bpe"),
        default="sentencepiece",
        help="sentencepiece (default) or bpe: a byte-level BPE tokenizer.json (tokenizers library, GLM-4's kind)",
    )
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe", help="sentencepiece's model type")
    parser.add_argument("--min-frequency", type=int, default=2, help="--type bpe: least count of a merged pair")
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters covered by pieces; the rest use byte fallback",
    )
    parser.add_argument(
        "--max-sentence-length",
        type=int,
        default=4192,
        help="longer texts are split into pieces of at most this many bytes",
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        help="sample this many sentences (0: all) to bound memory on huge corpora",
    )
    parser.add_argument("--no-byte-fallback", action="store_true", help="unknown characters become <unk>")
    parser.add_argument(
        "--add-dummy-prefix",
        action="store_true",
        help="prefix every text with a space (breaks exact concatenation of decoded pieces)",
    )
    parser.add_argument("--threads", type=int, default=None, help="trainer threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.type == "bpe":
        output = f"{args.model_prefix}.json"
        stats = train_byte_bpe(
            args.input,
            output,
            args.vocab_size,
            input_format=args.input_format,
            json_key=args.json_key,
            min_frequency=args.min_frequency,
        )
        tokenizer = open_tokenizer(output)
        print(
            f"trained byte-level BPE {output} in {time.perf_counter() - start:.1f}s: {stats.documents} documents, "
            f"{stats.bytes / 1e6:.1f} MB from {len(stats.files)} file(s); vocab {tokenizer.base_vocab_size} + "
            f"{tokenizer.vocab_size - tokenizer.base_vocab_size} special tokens = {tokenizer.vocab_size} "
            f"(padded {tokenizer.padded_vocab_size()})"
        )
        return
    stats = train_sentencepiece(
        args.input,
        args.model_prefix,
        args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        input_format=args.input_format,
        json_key=args.json_key,
        max_sentence_length=args.max_sentence_length,
        input_sentence_size=args.input_sentence_size,
        byte_fallback=not args.no_byte_fallback,
        add_dummy_prefix=args.add_dummy_prefix,
        num_threads=args.threads,
        seed=args.seed,
    )
    tokenizer = open_tokenizer(f"{args.model_prefix}.model")
    print(
        f"trained {args.model_type} model {args.model_prefix}.model in {time.perf_counter() - start:.1f}s: "
        f"{stats.documents} documents, {stats.bytes / 1e6:.1f} MB from {len(stats.files)} file(s), "
        f"{stats.split_documents} long documents split into pieces of <= {args.max_sentence_length} bytes; "
        f"vocab {tokenizer.base_vocab_size} + {len(tokenizer.command_tokens)} command tokens = "
        f"{tokenizer.vocab_size} (padded {tokenizer.padded_vocab_size()})"
    )


if __name__ == "__main__":
    run_cli(main)
