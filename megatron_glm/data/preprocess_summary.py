"""What a preprocessing run read, wrote and skipped; whether its result is usable at all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_glm.data.corpus import PROBLEM_KINDS
from megatron_glm.errors import DataError

__all__ = ["MAX_REPORTED", "PreprocessSummary", "Problem", "RecordCounts", "check_usable"]

#: Bad lines reported individually (by file and line number); the rest are only counted.
MAX_REPORTED = 10


@dataclass(frozen=True)
class Problem:
    """A skipped line."""

    path: str
    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(kw_only=True)
class RecordCounts:
    """What was read and written, per work unit or for the whole run (per output key where a dict)."""

    lines: int = 0
    blank_lines: int = 0
    bytes: int = 0
    """Input bytes read."""
    documents: int = 0
    """Documents written (to every output)."""
    tokens: dict[str, int] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)
    max_token_id: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad lines by kind (see :data:`~megatron_glm.data.corpus.PROBLEM_KINDS`)."""

    def add(self, other: RecordCounts) -> None:
        """Add the counts of ``other`` (which has at least this one's keys)."""
        self.lines += other.lines
        self.blank_lines += other.blank_lines
        self.bytes += other.bytes
        self.documents += other.documents
        for key in self.tokens:
            self.tokens[key] += other.tokens[key]
            self.sequences[key] += other.sequences[key]
            self.max_token_id[key] = max(self.max_token_id[key], other.max_token_id[key])
        for kind, count in other.skipped.items():
            self.skipped[kind] = self.skipped.get(kind, 0) + count


@dataclass
class PreprocessSummary(RecordCounts):
    """What a run read, wrote and skipped."""

    outputs: dict[str, str] = field(default_factory=dict)
    """Key -> output prefix."""
    files: int = 0
    problems: list[Problem] = field(default_factory=list)
    """The first :data:`MAX_REPORTED` bad lines."""
    seconds: float = 0.0
    resumed_units: int = 0
    """Work units reused from an interrupted run."""

    @classmethod
    def for_outputs(cls, outputs: dict[str, str], files: int) -> PreprocessSummary:
        """An empty summary of a run writing ``outputs`` (key -> output prefix) from ``files`` input files."""
        return cls(
            outputs=outputs,
            files=files,
            tokens=dict.fromkeys(outputs, 0),
            sequences=dict.fromkeys(outputs, 0),
            max_token_id=dict.fromkeys(outputs, -1),
        )

    @property
    def bad_fraction(self) -> float:
        """Bad records over non-blank records."""
        return sum(self.skipped.values()) / max(1, self.lines - self.blank_lines)

    def kinds(self) -> str:
        return ", ".join(f"{self.skipped[k]} {k}" for k in PROBLEM_KINDS if self.skipped.get(k))

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def rate_line(self, seconds: float | None = None) -> str:
        elapsed = max(seconds if seconds is not None else self.seconds, 1e-9)
        return (
            f"{self.documents:,} documents ({self.documents / elapsed:,.0f} docs/s), "
            f"{self.bytes / 1e6:,.1f} MB ({self.bytes / 1e6 / elapsed:.2f} MB/s), "
            f"{self.total_tokens:,} tokens ({self.total_tokens / elapsed:,.0f} tokens/s)"
        )

    def report(self) -> list[str]:
        """The end-of-run summary, one line each."""
        lines = [f"done in {self.seconds:.1f}s: {self.rate_line()}"]
        for key, prefix in self.outputs.items():
            lines.append(f"  {prefix}.bin/.idx: {self.sequences[key]:,} sequences, {self.tokens[key]:,} tokens")
        skipped = sum(self.skipped.values())
        if skipped:
            lines.append(
                f"skipped {skipped} bad line(s) of {self.lines:,} ({self.bad_fraction:.1%} of the non-blank "
                f"ones): {self.kinds()}"
            )
            lines.extend(f"  {problem}" for problem in self.problems)
            if skipped > len(self.problems):
                lines.append(f"  ... and {skipped - len(self.problems)} more")
        return lines


def check_usable(summary: PreprocessSummary, paths: Sequence[str], max_bad_fraction: float) -> None:
    """No document at all, or more bad records than ``max_bad_fraction``: an error, and nothing is written."""
    first = f"; first: {summary.problems[0]}" if summary.problems else ""
    bad = sum(summary.skipped.values())
    if summary.documents == 0:
        what = f"{bad} bad record(s) ({summary.kinds()})" if bad else "no records"
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise DataError(f"no usable document in {shown}: {summary.lines:,} line(s), {what}{first}; nothing was written")
    if summary.bad_fraction > max_bad_fraction:
        raise DataError(
            f"{bad:,} of {summary.lines - summary.blank_lines:,} non-blank records are bad "
            f"({summary.bad_fraction:.1%}: {summary.kinds()}), above --max-bad-fraction "
            f"{max_bad_fraction:g}{first}; nothing was written (wrong --input-format or --json-keys?)"
        )
