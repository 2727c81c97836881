"""The options of a preprocessing run (:class:`PreprocessConfig`) and the names of its outputs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_glm.config.sections import opt
from megatron_glm.data.corpus import INPUT_FORMATS
from megatron_glm.errors import DataError

__all__ = ["PreprocessConfig", "output_prefix_for"]


@dataclass(kw_only=True)
class PreprocessConfig:
    """What to preprocess and how (``tools/preprocess_data.py``'s options; ``--help`` shows this help)."""

    inputs: list[str] = opt(
        [],
        "Input files or glob patterns: JSONL / text (plain, .gz, .zst) or Parquet, mixed freely; processed in "
        "the order given (each glob sorted).",
        required=True,
    )
    output_prefix: str = opt("", "Outputs are {output_prefix}_{key}_{sentence|document}.bin/.idx.", required=True)
    tokenizer_model: str = opt(
        "",
        "The tokenizer: a sentencepiece model, a tokenizer.json (or a folder holding one) or a tiktoken BPE file.",
        required=True,
    )
    json_keys: list[str] = opt(
        ["text"],
        "JSONL keys (Parquet columns) to tokenize, each into its own dataset; a line missing one is skipped for all.",
    )
    input_format: str = opt(
        "auto",
        "auto (per file, by extension, else by the first line), jsonl (one JSON object a line) or text (one "
        "document a line); Parquet files are always read by column (the JSON keys name the columns).",
        choices=INPUT_FORMATS,
    )
    workers: int = opt(1, "Worker processes; 1 runs in this process.")
    split_sentences: bool = opt(False, "Store one sequence per sentence instead of one per document.")
    append_eod: bool = opt(False, "Append [eos] to the last sequence of every document.")
    strict: bool = opt(False, "Stop at the first bad line instead of skipping it.")
    log_interval: int = opt(10000, "Print a progress line every this many documents (checked as chunks finish).")
    chunk_bytes: int = opt(
        8 << 20,
        "Input bytes per work unit of a plain file (also what bounds each worker's memory); the tool's "
        "--chunk-mb gives it in MB.",
    )
    max_bad_fraction: float = opt(
        0.5, "Fail (writing nothing) when more than this fraction of the non-blank records is bad."
    )

    def validate(self) -> None:
        for flag, value in (
            ("--input", self.inputs),
            ("--output-prefix", self.output_prefix),
            ("--tokenizer-model", self.tokenizer_model),
        ):
            if not value:
                raise DataError(f"{flag} is required")
        if self.input_format not in INPUT_FORMATS:
            raise DataError(f"--input-format {self.input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
        if self.input_format == "text":
            self.json_keys = ["text"]
        if not self.json_keys or any(not key for key in self.json_keys):
            raise DataError(f"--json-keys {self.json_keys}: expected one or more non-empty keys")
        if len(set(self.json_keys)) != len(self.json_keys):
            raise DataError(f"--json-keys {self.json_keys}: keys repeat")
        if self.workers < 1:
            raise DataError(f"--workers {self.workers}: expected at least 1")
        if self.log_interval < 1:
            raise DataError(f"--log-interval {self.log_interval}: expected at least 1")
        if self.chunk_bytes < 1:
            raise DataError(f"chunk_bytes {self.chunk_bytes}: expected at least 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise DataError(f"--max-bad-fraction {self.max_bad_fraction}: expected a fraction in [0, 1]")
        directory = os.path.dirname(os.path.abspath(self.output_prefix))
        if not os.path.isdir(directory):
            raise DataError(f"--output-prefix {self.output_prefix}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            raise DataError(f"--output-prefix {self.output_prefix}: directory {directory} is not writable")


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool) -> str:
    """``{output_prefix}_{key}_{sentence|document}`` (Megatron's naming)."""
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"
