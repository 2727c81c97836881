"""Tokenize a JSONL or text corpus into Megatron-compatible ``.bin/.idx`` datasets (Megatron's flags).

Example (the embedded pydoc corpus, one sequence per sentence, EOD after every document)::

    python tools/export_pydoc_corpus.py --output data/pydoc.jsonl
    python tools/train_tokenizer.py --input data/pydoc.jsonl --vocab-size 4000 --model-prefix data/pydoc_bpe
    python tools/preprocess_data.py --input data/pydoc.jsonl --tokenizer-model data/pydoc_bpe.model \\
        --output-prefix data/pydoc --split-sentences --append-eod --workers 2

writes ``data/pydoc_text_sentence.bin/.idx`` (and a ``.meta.json`` sidecar). Inputs may be gzip or zstandard
compressed JSONL/text or Parquet (``--json-keys`` names the text column). Bad lines (invalid JSON or UTF-8,
missing keys, non-string values, lone surrogates, empty documents) are skipped and reported with their line
numbers; ``--strict`` stops at the first one; more than ``--max-bad-fraction`` bad, or no document at all,
is an error and nothing is written. A run that was killed resumes from its finished units when rerun.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.data.preprocess import PreprocessConfig, preprocess
from megatron_glm.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="JSONL / text (plain, .gz, .zst) or Parquet file(s) or glob(s), mixed freely",
    )
    group.add_argument(
        "--input-format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="auto (default): by extension, else by the first line; text: one document a line",
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSONL keys (Parquet columns) to tokenize (default: text)"
    )
    group.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.5,
        help="fail, writing nothing, when more of the records are bad (default: 0.5)",
    )
    group.add_argument("--split-sentences", action="store_true", help="store one sequence per sentence")
    group.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-model", required=True, help="sentencepiece model file")
    group.add_argument("--append-eod", action="store_true", help="append [eos] to every document")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_{sentence|document}.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    group.add_argument("--log-interval", type=int, default=10000, help="progress line every N documents")
    group.add_argument("--chunk-mb", type=float, default=8.0, help="input MB per work unit (default: 8)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model,
        json_keys=args.json_keys,
        input_format=args.input_format,
        workers=args.workers,
        split_sentences=args.split_sentences,
        append_eod=args.append_eod,
        strict=args.strict,
        log_interval=args.log_interval,
        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
        max_bad_fraction=args.max_bad_fraction,
    )
    summary = preprocess(config, log=lambda line: print(line, flush=True))
    for line in summary.report():
        print(line)


if __name__ == "__main__":
    run_cli(main)
