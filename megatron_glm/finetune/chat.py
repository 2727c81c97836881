"""Chat data: JSON lines of conversations, checked line by line, rendered and fitted into the window.

A line is ``{"messages": [{"role": "system" | "user" | "assistant" | "observation", "content": str}, ...],
"tools": [...]}`` (``tools`` optional, passed to the template). A conversation needs at least one assistant turn
with content. Every problem (bad JSON, an unknown role, a missing or non-string content, no assistant turn) is a
one-line error naming the file and line. Blank lines are skipped (line numbers stay the file's).

**Truncation** (a conversation longer than the window of ``length`` positions; it takes ``len(ids) - 1`` of
them, the last token being a label only): while a later *round* holds an assistant turn, the earliest round
after the leading system turns is dropped whole (a round starts at a user turn; turns before the first user turn form
the first round), and the conversation is rendered again; if the last round alone is still too long, its tokens
are cut at the window (the end of the last reply is then not trained). A conversation whose cut keeps no
assistant token is skipped. Nothing is an error: the counts are returned and logged (:class:`ChatStats`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from megatron_glm.errors import DataError
from megatron_glm.finetune.chat_template import ChatTemplate, Encoded
from megatron_glm.finetune.tasks import json_rows

ROLES = ("system", "user", "assistant", "observation")


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict[str, Any], ...]
    tools: Any = None
    line: int = 0


@dataclass
class ChatStats:
    """What fitting into the window did: conversations kept, rounds dropped, conversations cut or skipped."""

    kept: int = 0
    dropped_rounds: int = 0
    shortened: int = 0  # conversations that lost rounds
    cut: int = 0  # conversations whose last round was cut at the window
    skipped: list[int] = field(default_factory=list)  # lines of conversations with no assistant token left

    def summary(self) -> str:
        out = f"{self.kept} conversations"
        if self.shortened or self.cut or self.skipped:
            out += (
                f" (longer than the window: {self.shortened} lost {self.dropped_rounds} earliest round(s), "
                f"{self.cut} cut at the window, {len(self.skipped)} skipped with no assistant token left)"
            )
        return out


def _message(value: Any, where: str, i: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {type(value).__name__}")
    role = value.get("role")
    if role not in ROLES:
        raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
    if "content" not in value or value["content"] is None:
        raise DataError(f"{where}: message {i} ({role}) has no 'content'")
    if not isinstance(value["content"], str):
        raise DataError(
            f"{where}: message {i} ({role}): 'content' must be a string, got {type(value['content']).__name__}"
        )
    return dict(value)


def parse_conversation(row: Any, where: str, line: int) -> Conversation:
    """One line's conversation (a one-line :class:`DataError` naming ``where`` otherwise)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages', got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    parsed = tuple(_message(m, where, i) for i, m in enumerate(messages))
    if not any(m["role"] == "assistant" and m["content"].strip() for m in parsed):
        raise DataError(f"{where}: no assistant turn with content (nothing to train on)")
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list, got {type(tools).__name__}")
    return Conversation(parsed, tools, line)


def read_chat_file(path: str | os.PathLike[str]) -> list[Conversation]:
    """The conversations of a chat JSON-lines file, in file order."""
    out = []
    for row, where, n in json_rows(path, "chat file"):
        out.append(parse_conversation(row, where, n))
    if not out:
        raise DataError(f"{path}: no conversations")
    return out


def rounds(messages: tuple[dict[str, Any], ...]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """``(leading system turns, rounds)``: a round starts at each user turn (turns before the first one: round 0)."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    out: list[list[dict[str, Any]]] = []
    for m in messages[head:]:
        if m["role"] == "user" or not out:
            out.append([])
        out[-1].append(m)
    return list(messages[:head]), out


def fit(conv: Conversation, template: ChatTemplate, length: int, where: str, stats: ChatStats) -> Encoded | None:
    """The conversation's tokens in at most ``length + 1`` tokens (``length`` positions), by the truncation rule."""
    system, parts = rounds(conv.messages)
    flat = lambda: system + [m for part in parts for m in part]
    enc, dropped = template.conversation(flat(), conv.tools, where), 0
    while len(enc.ids) - 1 > length and any(m["role"] == "assistant" for part in parts[1:] for m in part):
        parts, dropped = parts[1:], dropped + 1
        enc = template.conversation(flat(), conv.tools, where)
    if dropped:
        stats.shortened, stats.dropped_rounds = stats.shortened + 1, stats.dropped_rounds + dropped
    if len(enc.ids) - 1 > length:
        stats.cut += 1
        enc = Encoded(enc.ids[: length + 1], enc.targets[: length + 1])
    if not any(enc.targets[1:]):
        stats.skipped.append(conv.line)
        return None
    stats.kept += 1
    return enc


def encode_conversations(
    conversations: list[Conversation], template: ChatTemplate, length: int, path: str
) -> tuple[list[Encoded], ChatStats]:
    """Every conversation fitted into ``length`` positions (skipped ones left out) and the truncation counts."""
    stats = ChatStats()
    out = [fit(c, template, length, f"{path}:{c.line}", stats) for c in conversations]
    return [e for e in out if e is not None], stats
