"""Config fields: a default with its help text (``metadata["help"]``, shown by ``--help`` and in docs)."""

from __future__ import annotations

from dataclasses import MISSING, field, fields
from typing import Any


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and a help string (shown by ``--help`` and in docs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


_SAME = object()


def opt_from(cls: type, name: str, *, default: Any = _SAME, note: str = "") -> Any:
    """A field taking another config's field ``cls.name`` over (its default unless given, its help with
    ``note`` appended, its choices), so that a tool's options do not restate the engine's facts."""
    f = {f.name: f for f in fields(cls)}[name]
    if default is _SAME:
        default = f.default if f.default is not MISSING else f.default_factory()
    meta = dict(f.metadata)
    return opt(default, f"{meta.pop('help', '')} {note}".strip(), **meta)
