"""Rendering conversations with a chat template, and which tokens are the assistant's (the trained ones).

The template is the tokenizer folder's own (``chat_template`` in ``tokenizer_config.json`` or a
``chat_template.jinja``), applied through transformers' ``apply_chat_template`` (for a folder transformers cannot
open without remote code, e.g. GLM-4-9B-chat's tiktoken one, its template file through transformers'
``render_jinja_template``, which ``apply_chat_template`` runs). Where the folder has none (or the
tokenizer is a single file), :data:`GLM4_CHAT_TEMPLATE` is used: GLM-4's format, every message one turn::

    [gMASK]<sop><|system|>\\n{content}<|user|>\\n{content}<|assistant|>\\n{content}<|observation|>\\n{content}...

(a ``tools`` list becomes a first ``<|system|>`` turn, ``# Available tools`` then one JSON object per tool; the
generation prompt is ``<|assistant|>``, after which the model writes ``\\n`` and its reply).

**The assistant-token rule** (GLM-4's own fine-tuning rule): the conversation's tokens are
``ids = encode(render(messages))``, plus the end of text when the rendering does not end with it. For the
assistant turn ``k``, ``a = encode(render(messages[:k], add_generation_prompt=True))`` (the prompt, ending with
``<|assistant|>``) and ``b = encode(render(messages[:k + 1]))`` must both be prefixes of ``ids`` (a template that
renders otherwise is an error naming the line); the turn's targets are ``ids[len(a):len(b)]`` (its reply:
``\\n{content}``) **and** its end marker ``ids[len(b)]``, the token that follows the reply: the next turn's role
token (``<|user|>`` / ``<|observation|>``, GLM-4's stop tokens) or the end of text after the last turn. So the
model learns to write the reply and to stop; ``<|assistant|>`` itself, and every other turn, is context only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_glm.errors import DataError

GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- if tools -%}<|system|>\n# Available tools"
    "{%- for tool in tools -%}{{ '\\n\\n' }}{{ tool | tojson }}{%- endfor -%}{%- endif -%}"
    "{%- for message in messages -%}<|{{ message['role'] }}|>\n{{ message['content'] }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
"""GLM-4's chat format (used only where the tokenizer folder has no template of its own)."""

CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


@dataclass(frozen=True)
class Encoded:
    """A rendered conversation: ``ids`` (ending with the end of text) and ``targets`` (1: an assistant token, the
    label of the position before it)."""

    ids: list[int]
    targets: list[int]


class ChatTemplate:
    """Renders conversations for ``tokenizer`` (ours: ids) with the template of the folder ``path``."""

    def __init__(self, path: str | os.PathLike[str], tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        for token in CHAT_TOKENS:
            try:
                tokenizer.token_to_id(token)
            except (KeyError, AttributeError):
                raise DataError(
                    f"{path}: the tokenizer has no {token} token: chat fine-tuning needs GLM-4's chat tokens "
                    f"({', '.join(CHAT_TOKENS)})"
                ) from None
        self.hf = _folder_tokenizer(path)
        own = getattr(self.hf, "chat_template", None) if self.hf is not None else folder_template(path)
        self.template = own if isinstance(own, str) and own else GLM4_CHAT_TEMPLATE
        self.source = f"{path}'s own" if self.template is not GLM4_CHAT_TEMPLATE else "the built-in GLM-4"

    def render(self, messages: Sequence[dict[str, Any]], tools: Any = None, generation_prompt: bool = False) -> str:
        kwargs = dict(tools=tools or None, add_generation_prompt=generation_prompt, chat_template=self.template)
        if self.hf is not None:
            return self.hf.apply_chat_template(list(messages), tokenize=False, **kwargs)
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered = render_jinja_template(conversations=[list(messages)], **kwargs)
        return rendered[0][0] if isinstance(rendered, tuple) else rendered

    def encode(
        self, messages: Sequence[dict[str, Any]], tools: Any = None, generation_prompt: bool = False
    ) -> list[int]:
        return self.tokenizer.encode(self.render(messages, tools, generation_prompt), allow_special=True)

    def conversation(self, messages: Sequence[dict[str, Any]], tools: Any, where: str) -> Encoded:
        """The conversation's tokens and assistant targets (the rule of the module docstring)."""
        ids = self.encode(messages, tools)
        eos = int(self.tokenizer.eos_id)
        if not ids or ids[-1] != eos:
            ids.append(eos)
        targets = [0] * len(ids)
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            a, b = self.encode(messages[:k], tools, True), self.encode(messages[: k + 1], tools)
            if ids[: len(a)] != a or ids[: len(b)] != b or len(b) <= len(a):
                raise DataError(
                    f"{where}: the chat template ({self.source}) does not render assistant turn {k} as a prefix of "
                    "the conversation (its prompt and reply must be the start of the whole rendering)"
                )
            end = min(len(b) + 1, len(ids))  # the reply and the token after it (a template's own end: within b)
            targets[len(a) : end] = [1] * (end - len(a))
        return Encoded(ids, targets)


def _folder_tokenizer(path: str | os.PathLike[str]) -> Any:
    """transformers' tokenizer of a local folder (``None`` for a single tokenizer file, or a folder transformers cannot
    open without remote code: its template is then read from the files, :func:`folder_template`)."""
    if not os.path.isdir(path):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError):
        return None


def folder_template(path: str | os.PathLike[str]) -> str | None:
    """The chat template a folder ships: ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``."""
    if not os.path.isdir(path):
        return None
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            value = json.load(f).get("chat_template")
        return value if isinstance(value, str) and value else None
    return None
