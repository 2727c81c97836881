"""Self-verification of a conversion: per-tensor shape/dtype/sha256 of merged tensors, and logits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from megatron_glm.checkpoint.stream import iter_layers, tensor_checksum
from megatron_glm.errors import CheckpointError

Checksums = dict[str, tuple[tuple[int, ...], str, str]]


def checksum_entry(t: torch.Tensor) -> tuple[tuple[int, ...], str, str]:
    return tuple(t.shape), str(t.dtype).removeprefix("torch."), tensor_checksum(t)


def stream_checksums(src: Any, get: Callable[[str], torch.Tensor | None]) -> Checksums:
    """Checksums of ``get(name)`` for every tensor of ``src`` (``None`` results skipped), layer by layer."""
    out: Checksums = {}
    for _, run in iter_layers(src.names()):
        for name in run:
            t = get(name)
            if t is not None:
                out[name] = checksum_entry(t)
        src.release()
    return out


def compare_checksums(expected: Checksums, actual: Checksums, what: str) -> None:
    """Raise :class:`CheckpointError` naming the first tensor whose shape, dtype or bytes differ."""
    missing = [n for n in expected if n not in actual]
    if missing:
        raise CheckpointError(f"verification failed: {what} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, (shape, dtype, digest) in expected.items():
        got = actual[name]
        if got[0] != shape or got[1] != dtype:
            raise CheckpointError(
                f"verification failed: {what}: {name} is {got[1]} {list(got[0])}, expected {dtype} {list(shape)}"
            )
        if got[2] != digest:
            raise CheckpointError(f"verification failed: {what}: {name} differs from the source (checksum)")


def fixed_batch(vocab: int, max_positions: int, batch: int = 2, seq: int = 32, seed: int = 0) -> dict[str, Any]:
    """A deterministic GLM input (Part A bidirectional, Part B causal with block positions)."""
    seq = min(seq, max_positions)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    sep = torch.full((batch,), max(1, seq // 2), dtype=torch.long)
    pos = torch.zeros(batch, 2, seq, dtype=torch.long)
    n = int(sep[0])
    pos[:, 0, :n] = torch.arange(n)
    pos[:, 0, n:] = n - 1
    pos[:, 1, n:] = torch.arange(1, seq - n + 1)
    return {"input_ids": ids, "position_ids": pos, "sep": sep}


@torch.no_grad()
def source_logits(src: Any, vocab: int, batch: dict[str, Any] | None = None) -> torch.Tensor:
    """fp32 logits ``[b, s, vocab]`` of ``src``'s model on a fixed batch (single process, dropout off).

    Only the first ``vocab`` columns are returned so that models with different vocab padding compare.
    """
    from megatron_glm.checkpoint.weights import materialize
    from megatron_glm.model import GLMModel

    cfg = dataclasses.replace(src.info.config, hidden_dropout=0.0, attention_dropout=0.0, attention_impl="eager")
    model = materialize(GLMModel(cfg, params_dtype=torch.float32, device="meta"), None)  # no random init drawn
    own = model.state_dict()
    unset = set(own) - set(src.names())
    if unset:
        raise CheckpointError(f"{src.info.path}: has no tensor {sorted(unset)[0]} (needed by its model)")
    for _, run in iter_layers(src.names()):
        for name in run:
            own[name].copy_(src.tensor(name).to(torch.float32))
        src.release()
    model.eval()
    batch = batch or fixed_batch(min(vocab, cfg.vocab_size), cfg.max_sequence_length)
    logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
    return logits[..., :vocab].clone()
