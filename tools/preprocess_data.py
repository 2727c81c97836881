"""Tokenize a JSONL or text corpus into Megatron-compatible ``.bin/.idx`` datasets (Megatron's flags).

Example (the embedded pydoc corpus, one sequence per sentence, EOD after every document)::

    python tools/export_pydoc_corpus.py --output data/pydoc.jsonl
    python tools/train_tokenizer.py --input data/pydoc.jsonl --vocab-size 4000 --model-prefix data/pydoc_bpe
    python tools/preprocess_data.py --input data/pydoc.jsonl --tokenizer-model data/pydoc_bpe.model \\
        --output-prefix data/pydoc --split-sentences --append-eod --workers 2

writes ``data/pydoc_text_sentence.bin/.idx`` (and a ``.meta.json`` sidecar). ``--tokenizer-model`` may also be a
``tokenizer.json``, a folder holding one (a GLM-4 release) or a tiktoken BPE file: the ids are then ``tokenizers``'
own (each worker encodes its records in batches). Inputs may be gzip or zstandard
compressed JSONL/text or Parquet (``--json-keys`` names the text column). Bad lines (invalid JSON or UTF-8,
missing keys, non-string values, lone surrogates, empty documents) are skipped and reported with their line
numbers; ``--strict`` stops at the first one; more than ``--max-bad-fraction`` bad, or no document at all,
is an error and nothing is written. A run that was killed resumes from its finished units when rerun.
Options may also come from ``--config FILE.yaml`` (keys as listed below) and dotted flags (``--workers 4``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.config import help_text, load_config
from megatron_glm.data.preprocess import PreprocessConfig, preprocess
from megatron_glm.errors import ConfigError, run_cli

#: Megatron's flag spellings -> (dotted path of :class:`PreprocessConfig`, constant for valueless flags or None).
PREPROCESS_FLAGS: dict[str, tuple[str, object]] = {
    "--input": ("inputs", None),
    **{
        f"--{name.replace('_', '-')}": (name, None)
        for name in ("input_format", "json_keys", "max_bad_fraction", "tokenizer_model", "output_prefix", "workers")
    },
    "--log-interval": ("log_interval", None),
    "--chunk-mb": ("chunk_bytes", None),  # given in MB: converted to bytes by parse_args
    "--split-sentences": ("split_sentences", True),
    "--strict": ("strict", True),
    "--append-eod": ("append_eod", True),
}


def _chunk_bytes(text: str) -> str:
    try:
        return str(max(1, int(float(text) * (1 << 20))))
    except ValueError:
        raise ConfigError(f"--chunk-mb: expected a number of MB, got {text!r}") from None


def parse_args(argv: list[str]) -> PreprocessConfig:
    """The typed options from the command line (Megatron's flags, ``--config FILE.yaml``, dotted paths)."""
    argv = list(argv)
    for i, token in enumerate(argv):  # --chunk-mb is in MB; the config holds bytes
        if token == "--chunk-mb" and i + 1 < len(argv):
            argv[i + 1] = _chunk_bytes(argv[i + 1])
        elif token.startswith("--chunk-mb="):
            argv[i] = "--chunk-mb=" + _chunk_bytes(token.partition("=")[2])
    return load_config(argv, root=PreprocessConfig, aliases=PREPROCESS_FLAGS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(help_text(PreprocessConfig, PREPROCESS_FLAGS))
        return 0
    config = parse_args(argv)
    summary = preprocess(config, log=lambda line: print(line, flush=True))
    for line in summary.report():
        print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
