"""``finetune_glm.py --task chat``'s data and evaluation: conversations -> packed causal rows, greedy replies.

Training rows: :mod:`.chat` (reading, the assistant-token rule, truncation) then :mod:`.packing`. Evaluation adds
``reply_1 .. reply_N`` to the held-out loss: the greedy reply to the first ``--chat-replies`` held-out
conversations, each prompted with the conversation up to its last assistant turn (rendered with the generation
prompt, ``<|assistant|>``), stopped at GLM-4's stop tokens or ``--target-length`` tokens (newlines written ``\\n``,
so a reply stays on the log's line).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_glm.errors import DataError
from megatron_glm.finetune.chat import Conversation, encode_conversations, read_chat_file
from megatron_glm.finetune.chat_template import ChatTemplate
from megatron_glm.finetune.config import FinetuneConfig
from megatron_glm.finetune.encode import TaskDataset
from megatron_glm.finetune.packing import chat_rows, empty_chat_row
from megatron_glm.generation.causal import continue_causal
from megatron_glm.generation.sampling import GenerationConfig
from megatron_glm.parallel import ParallelState
from megatron_glm.tokens import stop_token_ids


@dataclass
class ChatData:
    template: ChatTemplate
    train: TaskDataset
    valid: TaskDataset | None
    valid_conversations: list[Conversation]
    summary: str


def _dataset(
    path: str, task: FinetuneConfig, template: ChatTemplate, pad: int, *, shuffle: bool, seed: int = 0
) -> tuple[TaskDataset, list[Conversation], str]:
    conversations = read_chat_file(path)
    pack = task.chat_packing == "pack"
    encoded, stats = encode_conversations(conversations, template, task.chat_length, path)
    if not encoded:
        raise DataError(f"{path}: no conversation keeps an assistant token within --chat-length {task.chat_length}")
    rows = chat_rows(encoded, task.chat_length, pad, pack)
    padding = empty_chat_row(task.chat_length, pad, pack)
    dataset = TaskDataset(
        rows, rows_per_example=1, seq_length=task.chat_length, pad=pad, shuffle=shuffle, seed=seed, padding=padding
    )
    return dataset, conversations, f"{stats.summary()} in {len(rows)} rows"


def chat_data(task: FinetuneConfig, tokenizer: Any, tokenizer_path: str, seed: int) -> ChatData:
    """Read, render, truncate and pack the chat files (a malformed line is a one-line error before any set-up)."""
    template = ChatTemplate(tokenizer_path, tokenizer)
    train, _, train_summary = _dataset(task.train_data, task, template, tokenizer.pad_id, shuffle=True, seed=seed)
    valid, valid_convs, summary = None, [], ""
    if task.valid_data:
        valid, valid_convs, valid_summary = _dataset(task.valid_data, task, template, tokenizer.pad_id, shuffle=False)
        summary = f"; held out: {valid_summary}"
    packing = "packed" if task.chat_packing == "pack" else "one per row"
    text = (
        f"chat template: {template.source}; training: {train_summary} of {task.chat_length} positions ({packing})"
        f"{summary}"
    )
    return ChatData(template, train, valid, valid_convs, text)


def reply_prompt(template: ChatTemplate, conv: Conversation, room: int) -> list[int]:
    """The conversation up to its last assistant turn with the generation prompt, at most ``room`` tokens (the
    earliest after ``[gMASK]<sop>`` dropped)."""
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    ids = template.encode(conv.messages[:last], conv.tools, generation_prompt=True)
    return ids if len(ids) <= room else ids[:2] + ids[len(ids) - room + 2 :]


@torch.no_grad()
def chat_replies(
    model: torch.nn.Module,
    template: ChatTemplate,
    conversations: Sequence[Conversation],
    max_new_tokens: int,
    vocab_rows: int,
    ps: ParallelState | None = None,
) -> dict[str, str]:
    """``{"reply_1": text, ...}``: greedy replies (collective under tensor parallelism)."""
    if not conversations:
        return {}
    tok = template.tokenizer
    max_new = max(1, min(max_new_tokens, model.config.max_sequence_length - 2))
    room = model.config.max_sequence_length - max_new
    prompts = [reply_prompt(template, c, room) for c in conversations]
    banned = (*range(tok.vocab_size, vocab_rows), tok.pad_id)
    config = GenerationConfig(strategy="greedy", max_new_tokens=max_new, banned_ids=banned)
    results = continue_causal(model, prompts, tok.pad_id, stop_token_ids(tok), config, ps)
    return {f"reply_{i}": tok.decode(r.answers[0]).strip().replace("\n", "\\n") for i, r in enumerate(results, 1)}
