"""The GLM attention mask, written once as a mask function and built as a boolean or flex mask.

GLM's mixed mask (reference section 1): token ``i`` may attend to ``j`` when ``j < sep`` (Part A, seen
by everyone) or ``j <= i`` (causal). Part A is therefore bidirectional within itself and cannot see
Part B; Part B sees all of Part A and the earlier Part B tokens.

``attention_mask`` given to the model is either a ``[b]`` integer tensor of ``sep`` values or an
explicit boolean ``[b, 1, s, s]`` mask (True = may attend). :func:`prepare_attention_mask` turns either
into an :class:`AttentionMask` once per forward; every layer then uses the form its kernel needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def glm_mask_mod(sep: torch.Tensor) -> MaskMod:
    """The GLM mask as a flex-attention style function ``(b, h, q_idx, kv_idx) -> bool``.

    Works element-wise on broadcast index tensors, so the same function builds the dense boolean mask
    and the flex ``BlockMask``.
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (kv_idx < sep[b]) | (kv_idx <= q_idx)

    return mask_mod


def glm_document_mask_mod(sep: torch.Tensor, doc_ids: torch.Tensor) -> MaskMod:
    """The GLM mask restricted to each token's own document (``doc_ids [b, s]``): document isolation inside a
    packed window (Megatron's ``--reset-attention-mask``)."""
    glm = glm_mask_mod(sep)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return glm(b, h, q_idx, kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


CAUSAL = "causal"
"""Batch key of a flag found on the host (:func:`is_causal_sep` of the loader's ``sep``): every sample's mask is the
causal one, so :func:`batch_attention_mask` marks it for ``is_causal`` attention without reading the device."""


def batch_attention_mask(batch: Mapping[str, torch.Tensor], dense: bool = False) -> torch.Tensor | AttentionMask:
    """The model's ``attention_mask`` for a data batch: its ``sep`` values (an :class:`AttentionMask` marked causal
    when the batch carries the host's :data:`CAUSAL` flag), or with ``doc_ids`` (document isolation) the GLM mask
    within each document: an :class:`AttentionMask` of its mask function (evaluated only where a kernel needs it:
    context parallelism takes its rows from the per-token ``doc_ids``, never the ``[s, s]`` grid) or, ``dense``
    (pipeline stages pass tensors), the boolean ``[b, 1, s, s]`` mask."""
    if "doc_ids" not in batch:
        sep = batch["sep"]
        if not batch.get(CAUSAL, False):
            return sep
        b, s = batch["input_ids"].shape
        return AttentionMask(glm_mask_mod(sep.long()), b, s, sep.device, causal=True)
    doc_ids = batch["doc_ids"]
    b, s = doc_ids.shape
    mask = AttentionMask(glm_document_mask_mod(batch["sep"].long(), doc_ids), b, s, doc_ids.device)
    return mask.bool_mask if dense else mask


def dense_mask_mod(mask: torch.Tensor) -> MaskMod:
    """A mask function reading an explicit ``[b, 1, s, s]`` boolean mask."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return mask[b, 0, q_idx, kv_idx]

    return mask_mod


def materialize(
    mask_mod: MaskMod,
    batch: int,
    seq: int,
    device: torch.device | str,
    q_idx: torch.Tensor | None = None,
    kv_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evaluate ``mask_mod`` on the full grid: a boolean ``[batch, 1, seq, seq]`` tensor; or at the query positions
    ``q_idx [m]`` and key positions ``kv_idx [n]``: ``[batch, 1, m, n]``."""
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(seq, device=device) if q_idx is None else q_idx
    kv = torch.arange(seq, device=device) if kv_idx is None else kv_idx
    return mask_mod(b, h, q.view(1, 1, -1, 1), kv.view(1, 1, 1, -1))


def sep_to_mask(sep: torch.Tensor, seq: int) -> torch.Tensor:
    """The boolean ``[b, 1, seq, seq]`` GLM mask for Part A lengths ``sep`` (True = may attend)."""
    return materialize(glm_mask_mod(sep), sep.shape[0], seq, sep.device)


def is_causal_sep(sep: torch.Tensor) -> bool:
    """Whether ``[b]`` sep values make the plain causal mask (all ``<= 1``: an empty Part A, or one token that every
    later token sees anyway). It reads the values: call it on the loader's host tensor (as the trainer does,
    :data:`CAUSAL`), not on the device."""
    return bool(sep.numel()) and bool((sep <= 1).all())


@dataclass
class AttentionMask:
    """One forward's mask in the forms the attention kernels use (built lazily, once).

    ``bool_mask`` is ``[b, 1, s, s]`` (True = may attend) for SDPA and the eager path; ``block_mask``
    is a flex-attention ``BlockMask`` (CUDA only). ``causal``: the mask is known to be the plain causal mask
    (found on the host: :data:`CAUSAL`), so SDPA runs with ``is_causal`` instead of the boolean mask (on CPU its
    flash kernel then skips the blocks above the diagonal: the same values, bitwise, in ~30% less time).
    ``q_positions`` / ``kv_positions`` (context parallelism): the global positions of the rows and columns
    (``bool_mask`` is then ``[b, 1, m, n]``, evaluated there only).
    """

    mask_mod: MaskMod
    batch: int
    seq: int
    device: torch.device
    _bool: torch.Tensor | None = None
    _block: Any = None
    causal: bool = False
    q_positions: torch.Tensor | None = None
    kv_positions: torch.Tensor | None = None

    @property
    def bool_mask(self) -> torch.Tensor:
        if self._bool is None:
            q, kv = self.q_positions, self.kv_positions
            self._bool = materialize(self.mask_mod, self.batch, self.seq, self.device, q, kv)
        return self._bool

    @property
    def block_mask(self) -> Any:
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            self._block = create_block_mask(self.mask_mod, self.batch, None, self.seq, self.seq, device=self.device)
        return self._block


def prepare_attention_mask(
    attention_mask: torch.Tensor | AttentionMask,
    batch: int,
    seq: int,
    device: torch.device | str,
    kv_seq: int | None = None,
) -> AttentionMask:
    """Normalise the model's ``attention_mask`` argument (``[b]`` sep values or ``[b, 1, s, s]`` bool).

    ``kv_seq`` (generation with a KV cache): keys span ``kv_seq`` positions (cached + new); the mask must
    then be an explicit boolean ``[b, 1, seq, kv_seq]`` unless ``kv_seq == seq`` (an empty cache).
    """
    if isinstance(attention_mask, AttentionMask):
        return attention_mask
    device = torch.device(device)
    if kv_seq is not None and kv_seq != seq:
        if attention_mask.dim() != 4 or tuple(attention_mask.shape) != (batch, 1, seq, kv_seq):
            raise ValueError(
                f"with a KV cache attention_mask must be a [{batch}, 1, {seq}, {kv_seq}] boolean "
                f"mask, got {list(attention_mask.shape)}"
            )
        mask = attention_mask.to(device=device, dtype=torch.bool)
        return AttentionMask(dense_mask_mod(mask), batch, seq, device, _bool=mask)
    if attention_mask.dim() == 1:
        if attention_mask.is_floating_point() or attention_mask.dtype == torch.bool:
            raise TypeError(f"a 1-D attention_mask holds integer sep values, got {attention_mask.dtype}")
        if attention_mask.shape[0] != batch:
            raise ValueError(f"sep has {attention_mask.shape[0]} entries for a batch of {batch}")
        sep = attention_mask.to(device=device, dtype=torch.long)
        return AttentionMask(glm_mask_mod(sep), batch, seq, device)
    if attention_mask.dim() == 4:
        if tuple(attention_mask.shape) != (batch, 1, seq, seq):
            raise ValueError(f"attention_mask must be [{batch}, 1, {seq}, {seq}], got {list(attention_mask.shape)}")
        mask = attention_mask.to(device=device, dtype=torch.bool)
        return AttentionMask(dense_mask_mod(mask), batch, seq, device, _bool=mask)
    raise ValueError(f"attention_mask must be [b] sep values or a [b, 1, s, s] mask, got {list(attention_mask.shape)}")
