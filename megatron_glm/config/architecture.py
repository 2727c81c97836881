"""The architecture of a checkpoint, sealed: readers take it whole, formats check it whole.

A model's :class:`Architecture` (every :class:`ModelConfig` field but the execution options, built here from
``ModelConfig``'s fields so they are declared once) is recorded by every checkpoint. A reader (resume,
weights-only loading, fine-tuning; generation and evaluation have no model flags and build the checkpoint's model
as it is) takes it from the checkpoint with :func:`adopt_architecture`: a field the user did not set comes from
the checkpoint; one the user set to something else is refused, every such field named in one line, except

- the training-only fields (:data:`TRAINING_ONLY`: dropouts, init_std, embedding_grad_shrink), which do not change
  what the weights compute: the command line's value is used and logged;
- the fields of :data:`OVERRIDABLE` named in ``--override-architecture`` (``rotary_base``; ``max_sequence_length``
  of a rotary model, which has no position tables): used and logged.

A checkpoint format declares the architectures it can hold as an :class:`ArchitectureFamily`: a full architecture
value plus the fields the format records (closed world: any other field must have the family's value, so a new
field fails every export whose format does not declare it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import field, fields, make_dataclass, replace
from types import MappingProxyType
from typing import Any

from megatron_glm.config.moe import MOE_FIELDS
from megatron_glm.config.sections import GLMConfig, ModelConfig, ModelShape
from megatron_glm.errors import ConfigError

#: The fields of :class:`ModelConfig` that are execution options; every other field is the architecture (so a new
#: field is part of the architecture unless declared otherwise: checkpoints record it, readers and formats check it).
EXECUTION_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.metadata.get("execution"))
ARCHITECTURE_FIELDS = tuple(f.name for f in fields(ModelConfig) if not f.metadata.get("execution"))


class _ArchitectureMethods(ModelShape):
    """What :class:`Architecture` adds to its fields."""

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Architecture:
        """From a recorded model config (execution options and unknown keys ignored; a field an older checkpoint
        lacks takes its default, the behaviour before the field existed)."""
        return cls(**{k: v for k, v in values.items() if k in ARCHITECTURE_FIELDS})

    def canonical(self) -> Architecture:
        """The same math with implied values spelled out (the MLP size, head size and key/value groups), and the
        rotary options at their defaults when nothing rotates (the block-position switch when rotary: no tables), so
        equal models compare equal."""
        values = dict(ffn_hidden_size=self.ffn_size, kv_channels=self.head_dim, num_query_groups=self.query_groups)
        values["group_query_attention"] = self.query_groups != self.num_attention_heads
        if not self.num_experts:
            values.update({name: _DEFAULTS[name] for name in MOE_FIELDS})
        elif not self.moe_intermediate_size:
            values["moe_intermediate_size"] = self.ffn_size
        if not self.rotary:
            values.update({name: _DEFAULTS[name] for name in ROTARY_FIELDS})
        else:
            values["block_position_encoding"] = _DEFAULTS["block_position_encoding"]
        return replace(self, **values)

    def differences(self, other: Architecture) -> list[str]:
        """The fields whose math differs from ``other``'s (in field order; empty: the same architecture)."""
        a, b = self.canonical(), other.canonical()
        return [name for name in ARCHITECTURE_FIELDS if getattr(a, name) != getattr(b, name)]


ROTARY_FIELDS = ("rotary_percent", "rotary_base", "rotary_interleaved")
_MODEL_FIELDS = {f.name: f for f in fields(ModelConfig)}
_DEFAULTS = {name: _MODEL_FIELDS[name].default for name in ARCHITECTURE_FIELDS}

Architecture = make_dataclass(
    "Architecture",
    [
        (name, _MODEL_FIELDS[name].type, field(default=_DEFAULTS[name], metadata=_MODEL_FIELDS[name].metadata))
        for name in ARCHITECTURE_FIELDS
    ],
    bases=(_ArchitectureMethods,),
    frozen=True,
    kw_only=True,
)
Architecture.__module__ = __name__
Architecture.__doc__ = (
    "The architecture of a model as one sealed (frozen) value: :class:`ModelConfig`'s fields but the execution "
    "options, with ``to_dict`` / ``from_dict`` and ``differences(other)``. Every checkpoint records it; readers "
    "take it from the checkpoint (:func:`adopt_architecture`)."
)

#: Fields that shape training only (regularisation, initialisation, gradient scaling): the function the weights
#: compute does not depend on them, so a reader may take the command line's value and a format may drop them.
TRAINING_ONLY = frozenset(
    {
        "hidden_dropout",
        "attention_dropout",
        "init_std",
        "embedding_grad_shrink",
        "moe_bias_update_rate",
        "moe_aux_loss_coeff",
    }
)
#: Fields that ``--override-architecture`` may change (``max_sequence_length`` only with rotary positions).
OVERRIDABLE = frozenset({"rotary_base", "max_sequence_length"})


def _value(arch: Any, name: str) -> Any:
    return getattr(arch, name)


def explicit_architecture_fields(cfg: GLMConfig) -> set[str]:
    """The architecture fields the user set (YAML, command line or a named size)."""
    return {p.removeprefix("model.") for p in cfg.explicit if p.startswith("model.")} & set(ARCHITECTURE_FIELDS)


def _overrides(cfg: GLMConfig, saved: Architecture) -> set[str]:
    names = {n.strip() for v in cfg.checkpoint.override_architecture for n in v.split(",") if n.strip()}
    bad = sorted(names - OVERRIDABLE - TRAINING_ONLY)
    if bad:
        raise ConfigError(
            f"--override-architecture {', '.join(bad)}: only {', '.join(sorted(OVERRIDABLE))} may be overridden "
            f"(the training-only {', '.join(sorted(TRAINING_ONLY))} need no flag)"
        )
    if "max_sequence_length" in names and not saved.rotary:
        raise ConfigError(
            "--override-architecture max_sequence_length: the checkpoint has learned position tables "
            f"({saved.max_sequence_length} positions); only a rotary model can change it"
        )
    return names


def adopt_architecture(
    cfg: GLMConfig, saved: Architecture, where: str, log: Callable[[str], None] = print
) -> GLMConfig:
    """``cfg`` with the architecture of the checkpoint ``where`` (``saved``) and its own execution options.

    A field the user set that differs from ``saved`` is a one-line :class:`ConfigError` naming each (``field:
    checkpoint value vs command line value``) unless it is training-only or overridden (see the module docstring);
    those are used and logged."""
    mine = cfg.model.architecture()
    differing = [n for n in saved.differences(mine) if n in explicit_architecture_fields(cfg)]
    if "vocab_size" in differing and mine.vocab_size == 0:  # 0: derive it, i.e. the checkpoint's
        differing.remove("vocab_size")
    allowed = TRAINING_ONLY | _overrides(cfg, saved)
    refused = [n for n in differing if n not in allowed]
    if refused:
        listed = "; ".join(f"{n}: checkpoint {_value(saved, n)!r} vs command line {_value(mine, n)!r}" for n in refused)
        raise ConfigError(
            f"{where}: the command line contradicts the checkpoint's architecture ({listed}); drop these options "
            f"to take the checkpoint's"
            + (" or allow them with --override-architecture" if set(refused) <= OVERRIDABLE else "")
        )
    if differing:
        changed = ", ".join(f"{n} {_value(saved, n)!r} -> {_value(mine, n)!r}" for n in differing)
        log(f"{where}: the command line overrides the checkpoint's architecture: {changed}")
    arch = dataclasses.replace(saved, **{n: _value(mine, n) for n in differing})
    return dataclasses.replace(cfg, model=cfg.model.with_architecture(arch))


@dataclasses.dataclass(frozen=True)
class ArchitectureFamily:
    """The architectures a checkpoint format holds: ``value`` (a full architecture), whose fields other than
    ``recorded`` (the fields the format writes, any value) must be as in ``value`` or one of ``alternatives[field]``
    (values the format holds with the same forward, e.g. DeepNorm and post-LN alpha). Training-only fields are not
    checked (the format may drop them)."""

    name: str
    value: Architecture
    recorded: frozenset[str]
    alternatives: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        unknown = (set(self.recorded) | set(self.alternatives)) - set(ARCHITECTURE_FIELDS)
        if unknown:
            raise ValueError(f"family {self.name}: unknown architecture fields {sorted(unknown)}")

    def mismatches(self, arch: Architecture) -> list[str]:
        """Each field ``arch`` has that this family cannot hold, as ``"field = value (this layout: wanted)"``."""
        have = arch.canonical()  # the family's implied sizes (MLP, head, groups) follow the recorded shape fields:
        want = dataclasses.replace(self.value, **{n: _value(arch, n) for n in self.recorded}).canonical()
        out = []
        for name in ARCHITECTURE_FIELDS:
            if name in self.recorded or name in TRAINING_ONLY:
                continue
            allowed = (_value(want, name), *self.alternatives.get(name, ()))
            if _value(have, name) not in allowed:
                wanted = allowed if len(allowed) > 1 else allowed[0]
                out.append(f"{name} = {_value(arch, name)!r} (this layout: {wanted!r})")
        return out

    def mismatch(self, arch: Architecture) -> str | None:
        """:meth:`mismatches` as one phrase (``None``: the format holds ``arch``)."""
        return "; ".join(self.mismatches(arch)) or None
