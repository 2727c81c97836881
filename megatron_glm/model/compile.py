"""``torch.compile`` of the transformer layers, and a report of the graph breaks dynamo finds in one."""

from __future__ import annotations

from typing import Any

from torch import nn

from megatron_glm.model.transformer import GLMLayer


def compile_layers(module: nn.Module, **kwargs: Any) -> int:
    """Compile every :class:`GLMLayer` inside ``module`` in place (a ``GLMModel`` or a pipeline stage; names
    and state dict unchanged); returns how many. Compilation happens on the first forward (CPU: inductor +
    gcc, tens of seconds per distinct layer shape)."""
    layers = [m for m in module.modules() if isinstance(m, GLMLayer)]
    for layer in layers:
        layer.compile(**kwargs)
    return len(layers)


def graph_breaks(layer: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
    """The graph breaks dynamo hits tracing ``layer(*args, **kwargs)`` (one line each; empty: one graph)."""
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(*args, **kwargs)
    torch._dynamo.reset()
    return [f"{b.reason}" for b in explanation.break_reasons]


def is_compiled(layer: nn.Module) -> bool:
    """Whether ``layer.compile()`` was called on it."""
    return getattr(layer, "_compiled_call_impl", None) is not None
