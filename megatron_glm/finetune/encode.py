"""Task examples as fixed-length GLM rows (the pretraining batch interface), datasets and collation.

A row is one GLM sequence of ``FinetuneConfig.seq_length`` tokens::

    Part A: [CLS] source (+ [gMASK])          positions 0..n-1, block positions 0, bidirectional (sep = n)
    Part B: [sop] y1 .. y(k-1)                position = the blank's position, block positions 1..k
    labels: y1 .. yk                          loss_mask 1 on these k tokens; padding after (mask 0)

- seq2seq: one row per example, ``y = target[:target_length] + [eop]``.
- cloze: one row per choice, ``y = the choice's tokens`` (no ``[eop]``: a choice is scored by the
  log-probability of its own tokens in the blank). Every example has ``num_choices`` rows (the most
  choices of the task's files); missing choices are empty padding rows.

``objective`` (``[rows]``) tells rows apart: :data:`ROW_TASK` (a seq2seq row or a wrong choice),
:data:`ROW_ANSWER` (the labelled choice), :data:`ROW_PAD` (padding). They follow the pretraining objectives'
ids (:data:`~megatron_glm.batch.OBJECTIVE_NAMES`), so task rows never count as a pretraining objective in the logs.

Tokenization: a target or choice is encoded after a space (``" " + text``), as a span of running text is
in pretraining (a blank carries its leading space; :func:`~megatron_glm.generation.encode_prompt` drops the
space written before a blank).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from megatron_glm.batch import OBJECTIVE_NAMES
from megatron_glm.data.loader import MicroBatchSampler
from megatron_glm.errors import DataError
from megatron_glm.finetune.config import FinetuneConfig
from megatron_glm.finetune.tasks import BLANKS, ClozeExample, Seq2SeqExample
from megatron_glm.generation import InfillTokens, encode_prompt

ROW_TASK, ROW_ANSWER, ROW_PAD = (len(OBJECTIVE_NAMES) + k for k in range(3))
KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "sep", "objective")


def glm_row(
    part_a: Sequence[int],
    blank: int,
    labels_b: Sequence[int],
    *,
    start: int,
    length: int,
    pad: int,
    objective: int = ROW_TASK,
) -> dict[str, np.ndarray]:
    """One row: Part A, then ``[start] labels_b[:-1]`` predicting ``labels_b`` at the blank ``blank``."""
    n, k = len(part_a), len(labels_b)
    if n + k > length:
        raise ValueError(f"row of {n} + {k} tokens does not fit in {length}")
    ids = np.full(length, pad, dtype=np.int64)
    labels = np.full(length, pad, dtype=np.int64)
    mask = np.zeros(length, dtype=np.float32)
    pos = np.zeros((2, length), dtype=np.int64)
    ids[:n] = part_a
    pos[0, :n] = np.arange(n)
    if k:
        ids[n] = start
        ids[n + 1 : n + k] = labels_b[:-1]
        labels[n : n + k] = labels_b
        mask[n : n + k] = 1.0
        pos[0, n : n + k] = blank
        pos[1, n : n + k] = np.arange(1, k + 1)
    return {
        "input_ids": ids,
        "labels": labels,
        "loss_mask": mask,
        "position_ids": pos,
        "sep": np.int64(n),
        "objective": np.int64(objective),
    }


def empty_row(length: int, pad: int) -> dict[str, np.ndarray]:
    """A padding row: one [pad] token as Part A, no loss."""
    return glm_row([pad], 0, [], start=pad, length=length, pad=pad, objective=ROW_PAD)


class TaskEncoder:
    """Token ids of task examples under the length limits and truncation rule of a :class:`FinetuneConfig`."""

    def __init__(self, tokenizer: Any, cfg: FinetuneConfig, path: str = "") -> None:
        self.tokenizer, self.cfg, self.path = tokenizer, cfg, path
        self.tokens = InfillTokens.from_tokenizer(tokenizer)

    def _where(self, line: int) -> str:
        return f"{self.path}:{line}" if self.path else f"line {line}"

    def part_a(self, text: str, line: int = 0) -> list[int]:
        """``[CLS]`` + the text's tokens (its blanks kept, ``[gMASK]`` appended without one); the text's
        tokens (blanks included) are limited to ``source_length`` by the rule of ``source_truncation``."""
        ids = encode_prompt(self.tokenizer, text, self.tokens)
        appended = int(not any(b in text for b in BLANKS))  # the [gMASK] encode_prompt added
        excess = len(ids) - 1 - appended - self.cfg.source_length
        if excess <= 0:
            return ids
        rule = self.cfg.source_truncation
        if rule == "error":
            raise DataError(
                f"{self._where(line)}: source has {len(ids) - 1 - appended} tokens, more than "
                f"--source-length {self.cfg.source_length} (raise it or pass --source-truncation "
                f"left/right)"
            )
        removable = [i for i, t in enumerate(ids) if i > 0 and t not in self.tokens.blanks]
        drop = set(removable[:excess] if rule == "left" else removable[len(removable) - excess :])
        return [t for i, t in enumerate(ids) if i not in drop]

    def continuation(self, text: str) -> list[int]:
        """Tokens of a target / choice as it follows a space in running text."""
        return self.tokenizer.encode(" " + text.strip(), allow_special=False)

    def blank(self, part_a: Sequence[int]) -> int:
        """Position of the first blank of Part A (the one a target or choice fills)."""
        return next(i for i, t in enumerate(part_a) if t in self.tokens.blanks)

    def seq2seq(self, ex: Seq2SeqExample) -> list[dict[str, np.ndarray]]:
        a = self.part_a(ex.source, ex.line)
        target = [*self.continuation(ex.target)[: self.cfg.target_length], self.tokens.eop]
        return [
            glm_row(a, self.blank(a), target, start=self.tokens.sop, length=self.cfg.seq_length, pad=self.tokens.pad)
        ]

    def choices(self, ex: ClozeExample) -> list[list[int]]:
        out = []
        for j, choice in enumerate(ex.choices):
            ids = self.continuation(choice)
            if len(ids) > self.cfg.target_length:
                raise DataError(
                    f"{self._where(ex.line)}: choice {j} has {len(ids)} tokens, more than "
                    f"--target-length {self.cfg.target_length}"
                )
            out.append(ids)
        return out

    def cloze(self, ex: ClozeExample, num_choices: int) -> list[dict[str, np.ndarray]]:
        a = self.part_a(ex.text, ex.line)
        blank = a.index(self.tokenizer.mask_id)
        rows = [
            glm_row(
                a,
                blank,
                ids,
                start=self.tokens.sop,
                length=self.cfg.seq_length,
                pad=self.tokens.pad,
                objective=ROW_ANSWER if j == ex.label else ROW_TASK,
            )
            for j, ids in enumerate(self.choices(ex))
        ]
        return rows + [empty_row(self.cfg.seq_length, self.tokens.pad)] * (num_choices - len(rows))


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in KEYS}


class TaskDataset(torch.utils.data.Dataset):
    """Index ``i`` -> the rows of one example (``rows_per_example`` of them), pre-encoded.

    ``shuffle`` (training): epochs of a permutation drawn from ``(seed, epoch)``, endless, so a run resumed
    at ``consumed_samples`` sees exactly the examples of an uninterrupted run. Otherwise (evaluation) index
    ``i < len(examples)`` is example ``i`` and later indices are padding examples (no loss), so every
    data-parallel rank gets whole micro-batches.
    """

    def __init__(
        self,
        encoded: list[dict[str, np.ndarray]],
        *,
        rows_per_example: int,
        seq_length: int,
        pad: int,
        shuffle: bool,
        seed: int = 0,
        padding: dict[str, np.ndarray] | None = None,
    ) -> None:
        if not encoded:
            raise DataError("no examples")
        self.encoded, self.rows, self.shuffle, self.seed = encoded, rows_per_example, shuffle, int(seed)
        self.padding = padding if padding is not None else stack_rows([empty_row(seq_length, pad)] * rows_per_example)
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def num_examples(self) -> int:
        return len(self.encoded)

    def __len__(self) -> int:
        return 2**62

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples))
        return self._perm[1]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index, n = int(index), self.num_examples
        if self.shuffle:
            return self.encoded[int(self._order(index // n)[index % n])]
        return self.encoded[index] if index < n else self.padding


def collate_rows(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Concatenate the examples' rows: the batch interface with ``rows = examples x rows_per_example`` (the keys of
    the rows: :data:`KEYS`, and chat rows' ``doc_ids``)."""
    return {k: torch.from_numpy(np.concatenate([s[k] for s in samples])) for k in samples[0]}


def task_batches(
    dataset: TaskDataset,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of ``micro_batch_size`` examples, resumed at ``consumed_samples`` examples
    (``pin_memory``: page-locked, for non-blocking copies to a GPU)."""
    sampler = MicroBatchSampler(consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=0, collate_fn=collate_rows, pin_memory=pin_memory
    )
    return iter(loader)


def num_choices(examples: Sequence[ClozeExample]) -> int:
    return max(len(ex.choices) for ex in examples)


def encode_examples(
    encoder: TaskEncoder, examples: Sequence[Any], task: str, choices: int = 0
) -> list[dict[str, np.ndarray]]:
    """Every example's stacked rows (errors name the example's line)."""
    if task == "seq2seq":
        return [stack_rows(encoder.seq2seq(ex)) for ex in examples]
    return [stack_rows(encoder.cloze(ex, choices)) for ex in examples]
