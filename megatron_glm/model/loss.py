"""The GLM loss: vocab-parallel cross entropy (fp32) masked by ``loss_mask``, mean over masked tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_glm.parallel import ParallelState, fused_head_cross_entropy, vocab_parallel_cross_entropy


@dataclass
class GLMLoss:
    """``loss``: the scalar to back-propagate (masked mean). The rest is for logging.

    ``per_token``: fp32 ``[b, s]`` loss times ``loss_mask``; ``sample_sum`` / ``sample_tokens``: ``[b]``
    sums of ``per_token`` and of ``loss_mask`` (per-objective losses are sums of these over the samples
    of one objective, see :meth:`by_group`). ``aux``: the auxiliary terms (e.g. an MoE load-balancing loss)
    included in ``loss``, by name (``megatron_glm.model.objective.with_aux``). ``parts`` (detached, for the logs;
    empty without auxiliary terms): ``lm`` (:data:`LM_PART`, the language-model loss alone), ``mtp`` (the MTP loss
    unweighted) and the other terms as added to ``loss``.
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    sample_sum: torch.Tensor
    sample_tokens: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def group_sums(self, groups: torch.Tensor) -> torch.Tensor:
        """``[GROUP_SLOTS, 2]`` float64 ``(loss sum, token count)`` by group id (``groups``: ``[b]`` integers in
        ``[0, GROUP_SLOTS)``), left on the device: no host synchronisation (:func:`group_sums_dict` reads it)."""
        values = torch.stack([self.sample_sum.detach(), self.sample_tokens.detach()], dim=-1).double()
        sums = torch.zeros(GROUP_SLOTS, 2, dtype=torch.float64, device=values.device)
        return sums.index_add_(0, groups.to(values.device, torch.long), values)

    def by_group(self, groups: torch.Tensor) -> dict[int, tuple[float, float]]:
        """``{group id: (loss sum, token count)}`` for a ``[b]`` integer tensor (e.g. the objective)."""
        out: dict[int, tuple[float, float]] = {}
        sums, counts = self.sample_sum.detach(), self.sample_tokens.detach()
        for g in groups.unique().tolist():
            sel = groups == g
            out[int(g)] = (float(sums[sel].sum()), float(counts[sel].sum()))
        return out


LM_PART = "lm"
"""The language-model loss (the total without the auxiliary terms) among :attr:`GLMLoss.parts`."""

GROUP_SLOTS = 8
"""Group ids :meth:`GLMLoss.group_sums` takes: the objectives (0-3), fine-tuning's row kinds (up to 6)."""


def group_sums_dict(sums: torch.Tensor | None) -> dict[int, list[float]]:
    """:meth:`GLMLoss.group_sums` (or their sum) read back as ``{group: [loss sum, token count]}`` (one host copy),
    groups that saw nothing left out."""
    if sums is None:
        return {}
    return {g: [s, n] for g, (s, n) in enumerate(sums.tolist()) if s or n}


def group_sums_tensor(sums: dict[int, list[float]], device: torch.device | str) -> torch.Tensor:
    """``{group: [loss sum, token count]}`` as the ``[GROUP_SLOTS, 2]`` float64 tensor of :meth:`GLMLoss.group_sums`."""
    out = torch.zeros(GROUP_SLOTS, 2, dtype=torch.float64)
    for g, (s, n) in sums.items():
        out[g] = torch.tensor([s, n], dtype=torch.float64)
    return out.to(device)


def add_group_sums(acc: dict[int, list[float]], sums: dict[int, tuple[float, float]] | dict[int, list[float]]) -> None:
    """Add ``{group: (loss sum, token count)}`` (e.g. :meth:`GLMLoss.by_group`) into ``acc`` in place."""
    for k, (s, n) in sums.items():
        entry = acc.setdefault(k, [0.0, 0.0])
        entry[0] += s
        entry[1] += n


def _scatter_rows(rows: torch.Tensor, positions: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """Per-row values at flat ``positions`` scattered into a zero ``[b, s]`` fp32 tensor."""
    flat = torch.zeros(b * s, dtype=torch.float32, device=rows.device)
    return flat.index_add(0, positions, rows).view(b, s)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, total: torch.Tensor | None = None) -> GLMLoss:
    """The masked mean (``total``, when given, is the loss sum computed with its own gradient path)."""
    sample_sum, sample_tokens = per_token.sum(dim=-1), mask.sum(dim=-1)
    loss = (sample_sum.sum() if total is None else total) / sample_tokens.sum().clamp(min=1.0)
    return GLMLoss(loss, per_token, sample_sum, sample_tokens)


def glm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    parallel_state: ParallelState | None = None,
    *,
    label_smoothing: float = 0.0,
) -> GLMLoss:
    """Masked mean cross entropy of vocab-parallel ``logits [b, s, V/tp]`` against ``labels [b, s]``.

    Computed in fp32 whatever the logits' dtype; a batch with no masked token gives loss 0 (and zero
    gradients) instead of NaN.
    """
    group = (parallel_state or ParallelState()).tp_group
    token_loss = vocab_parallel_cross_entropy(logits, labels, group, label_smoothing)
    mask = loss_mask.to(torch.float32)
    return _reduce(token_loss * mask, mask)


def loss_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (into ``b * s``) of the tokens that carry loss (``loss_mask != 0``)."""
    return loss_mask.reshape(-1).nonzero().squeeze(-1)


def glm_loss_at(
    logits: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    parallel_state: ParallelState | None = None,
    *,
    label_smoothing: float = 0.0,
) -> GLMLoss:
    """:func:`glm_loss` for logits computed at ``positions`` only (``[n, V/tp]``, see
    ``GLMModel.forward(logit_positions=...)``); every ``loss_mask`` token must be among the positions.

    Same value and gradients as the full-sequence loss; ``per_token`` is scattered back to ``[b, s]``.
    """
    group = (parallel_state or ParallelState()).tp_group
    b, s = labels.shape
    mask = loss_mask.to(torch.float32)
    token_loss = vocab_parallel_cross_entropy(
        logits, labels.reshape(-1).index_select(0, positions), group, label_smoothing
    )
    rows = token_loss * mask.reshape(-1).index_select(0, positions)
    return _reduce(_scatter_rows(rows, positions, b, s), mask)


def glm_loss_fused(
    rows: torch.Tensor,
    head_weight: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    parallel_state: ParallelState | None = None,
    *,
    chunk: int = 1024,
    label_smoothing: float = 0.0,
    grad_scale: float = 1.0,
) -> GLMLoss:
    """:func:`glm_loss_at` with the tied head fused into the loss, ``chunk`` rows at a time
    (:func:`~megatron_glm.parallel.fused_head_cross_entropy`): the ``[n, V/tp]`` logits are never stored.

    ``rows [n, H]``: final hidden states at ``positions`` (already through ``copy_to_tensor_parallel_region``);
    ``head_weight [V/tp, H]``. Same loss and gradients as the unfused head; ``per_token`` carries no gradient.
    ``grad_scale``: the factor backward will bring to the mean loss (in fp16 the loss scale over the
    gradient accumulation steps), so the head's fp16 gradient is rounded at the scale the unfused one is.
    """
    group = (parallel_state or ParallelState()).tp_group
    b, s = labels.shape
    mask = loss_mask.to(torch.float32)
    row_mask = mask.reshape(-1).index_select(0, positions)
    total, token_loss = fused_head_cross_entropy(
        rows,
        head_weight,
        labels.reshape(-1).index_select(0, positions),
        row_mask,
        group,
        chunk=chunk,
        label_smoothing=label_smoothing,
        grad_scale=grad_scale / mask.sum().clamp(min=1.0),  # what backward brings to the sum (no host sync)
    )
    return _reduce(_scatter_rows(token_loss * row_mask, positions, b, s), mask, total)


_compiled: Any = None


def compiled_glm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    parallel_state: ParallelState | None = None,
    *,
    label_smoothing: float = 0.0,
) -> GLMLoss:
    """:func:`glm_loss` through ``torch.compile``: the fp32 upcast, softmax statistics and gradient fuse
    into a few passes over the logits (about 3x faster on CPU); compiled on first call."""
    global _compiled  # one process-wide compiled function, not state
    if _compiled is None:
        _compiled = torch.compile(glm_loss)
    return _compiled(logits, labels, loss_mask, parallel_state, label_smoothing=label_smoothing)
