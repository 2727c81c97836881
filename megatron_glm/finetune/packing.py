"""Encoded conversations as causal rows of ``length`` positions, packed several to a row or one per row.

A conversation of tokens ``t_0 .. t_n`` (``[gMASK]<sop>...``, the end of text last) takes ``n`` positions::

    input_ids  t_0 .. t_(n-1)          labels  t_1 .. t_n          loss_mask  targets of t_1 .. t_n
    positions  0 .. n-1 (block positions 0), restarting at 0 for every conversation of a row

Rows are causal (``sep`` 0). Packed (``pack=True``), each conversation in file order goes to the first of the
latest :data:`OPEN_ROWS` rows with room for it (after the conversations already there), else to a new row; each row
carries ``doc_ids`` (each position's conversation, -1 on
padding): attention is then causal within each conversation only (the block-diagonal mask of
:func:`~megatron_glm.model.masks.glm_document_mask_mod`), so a packed conversation is computed exactly as alone.
Padding is ``[pad]``, position 0, no loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_glm.finetune.chat_template import Encoded
from megatron_glm.finetune.encode import ROW_TASK


def empty_chat_row(length: int, pad: int, pack: bool) -> dict[str, np.ndarray]:
    """A row of padding (``[1, ...]`` arrays, the batch keys): no loss."""
    row = {
        "input_ids": np.full((1, length), pad, dtype=np.int64),
        "labels": np.full((1, length), pad, dtype=np.int64),
        "loss_mask": np.zeros((1, length), dtype=np.float32),
        "position_ids": np.zeros((1, 2, length), dtype=np.int64),
        "sep": np.zeros(1, dtype=np.int64),
        "objective": np.full(1, ROW_TASK, dtype=np.int64),
    }
    if pack:
        row["doc_ids"] = np.full((1, length), -1, dtype=np.int64)
    return row


def _place(row: dict[str, np.ndarray], at: int, doc: int, enc: Encoded) -> int:
    n = len(enc.ids) - 1
    span = slice(at, at + n)
    row["input_ids"][0, span] = enc.ids[:-1]
    row["labels"][0, span] = enc.ids[1:]
    row["loss_mask"][0, span] = enc.targets[1:]
    row["position_ids"][0, 0, span] = np.arange(n)
    if "doc_ids" in row:
        row["doc_ids"][0, span] = doc
    return at + n


#: Packing looks for room in the latest rows only (first fit among them), so it stays linear in the conversations.
OPEN_ROWS = 64


def chat_rows(conversations: Sequence[Encoded], length: int, pad: int, pack: bool) -> list[dict[str, np.ndarray]]:
    """The rows of the conversations (each at most ``length`` positions: :func:`~megatron_glm.finetune.chat.fit`)."""
    rows: list[dict[str, np.ndarray]] = []
    used: list[list[int]] = []  # per row: positions taken, conversations placed
    for enc in conversations:
        n = len(enc.ids) - 1
        if not 0 < n <= length:
            raise ValueError(f"a conversation of {n} positions does not fit a row of {length}")
        first = max(0, len(rows) - OPEN_ROWS)
        r = next((r for r in range(first, len(rows)) if used[r][0] + n <= length), None) if pack else None
        if r is None:
            rows.append(empty_chat_row(length, pad, pack))
            used.append([0, 0])
            r = len(rows) - 1
        used[r] = [_place(rows[r], used[r][0], used[r][1], enc), used[r][1] + 1]
    return rows
