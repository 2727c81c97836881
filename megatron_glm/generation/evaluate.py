"""Evaluation beyond the training loss: validation loss / perplexity per objective, and cloze accuracy.

- :func:`evaluate_loss`: masked cross entropy over batches of the pretraining format (the held-out split
  built exactly as training builds it), overall and per objective (token / sentence / document).
- :func:`cloze_accuracy`: LAMBADA-style last-word prediction. Each example ``{"context", "target"}`` is
  laid out as Part A ``[CLS] context [MASK]`` and Part B ``[sop] target``; it is correct when the greedy
  (argmax) prediction at every Part B position equals the next target token, i.e. greedy generation
  of the blank starts with the whole target word.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.batch import Batch
from megatron_glm.errors import DataError
from megatron_glm.model import GLMLoss, batch_attention_mask, glm_loss
from megatron_glm.parallel import ParallelState, gather_from_tensor_parallel_region
from megatron_glm.training.evaluation import accumulate_losses, summarize_losses


def _ps(model: torch.nn.Module, parallel_state: ParallelState | None) -> ParallelState:
    return parallel_state or getattr(model, "parallel_state", None) or ParallelState()


def _dp_sum(values: list[float], parallel_state: ParallelState, device: torch.device) -> list[float]:
    ps = parallel_state
    if ps.dp_size == 1 or ps.dp_group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ps.dp_group)
    return t.tolist()


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_batches: int,
    parallel_state: ParallelState | None = None,
) -> dict[str, float]:
    """``loss``, ``ppl``, ``tokens`` and ``loss_<objective>`` / ``ppl_<objective>`` over ``num_batches``
    batches (dicts with ``input_ids, position_ids, sep, labels, loss_mask`` and optionally ``objective``);
    summed over data-parallel ranks."""
    ps = _ps(model, parallel_state)
    device = next(model.parameters()).device
    model.eval()

    def forward(batch: Batch) -> GLMLoss:
        b = {k: v.to(device) for k, v in batch.items()}
        logits = model(b["input_ids"], b["position_ids"], batch_attention_mask(b))
        return glm_loss(logits, b["labels"], b["loss_mask"], ps)

    sums = accumulate_losses(forward, iter(batches), num_batches)
    return summarize_losses(sums, lambda v: _dp_sum(v, ps, device))


@dataclass(frozen=True)
class ClozeExample:
    context: str
    target: str


def read_cloze_jsonl(path: str | os.PathLike[str]) -> list[ClozeExample]:
    """``{"context": ..., "target": ...}`` per line (blank lines skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read cloze file ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(ClozeExample(str(row["context"]), str(row["target"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: expected a JSON object with 'context' and 'target'") from None
    if not out:
        raise DataError(f"{path}: no cloze examples")
    return out


def cloze_ids(tokenizer: Any, example: ClozeExample) -> tuple[list[int], list[int]]:
    """Context and target token ids; the target is tokenized as it continues the context (a word after a
    space), falling back to tokenizing it alone."""
    context = tokenizer.encode(example.context, allow_special=False)
    joined = example.context + ("" if example.context.endswith((" ", "\n")) else " ") + example.target.lstrip()
    full = tokenizer.encode(joined, allow_special=False)
    if full[: len(context)] == context and len(full) > len(context):
        return context, full[len(context) :]
    return context, tokenizer.encode(example.target, allow_special=False)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def cloze_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[ClozeExample],
    *,
    blank: str = "[MASK]",
    batch_size: int = 8,
    parallel_state: ParallelState | None = None,
) -> dict[str, float]:
    """``accuracy`` (whole target predicted greedily), ``token_accuracy`` and ``count`` over ``examples``.

    ``blank`` is the blank token of Part A (``[MASK]`` for token-level models, ``[gMASK]`` for
    document-level ones). Part A is truncated from the left to fit the model's positions.
    """
    ps = _ps(model, parallel_state)
    device = next(model.parameters()).device
    model.eval()
    blank_id = tokenizer.token_to_id(blank)
    max_pos = model.config.max_sequence_length
    correct = tokens_ok = tokens_all = 0
    for chunk in _chunks(list(examples), batch_size):
        rows = []
        for ex in chunk:
            context, target = cloze_ids(tokenizer, ex)
            target = target[: max_pos - 1]
            part_a = [*[tokenizer.cls_id, *context][-(max_pos - 1) :], blank_id]
            rows.append((part_a, target))
        length = max(len(a) + len(t) for a, t in rows)
        ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
        pos = torch.zeros(len(rows), 2, length, dtype=torch.long)
        sep = torch.tensor([len(a) for a, _ in rows], dtype=torch.long)
        for i, (a, t) in enumerate(rows):
            n, k = len(a), len(t)
            ids[i, :n] = torch.tensor(a)
            ids[i, n] = tokenizer.sop_id
            ids[i, n + 1 : n + k] = torch.tensor(t[:-1], dtype=torch.long)
            pos[i, 0, :n] = torch.arange(n)
            pos[i, 0, n : n + k] = n - 1
            pos[i, 1, n : n + k] = torch.arange(1, k + 1)
        # Right padding is invisible to real tokens under the sep mask (Part B is causal).
        logits = model(ids.to(device), pos.to(device), sep.to(device))
        predicted = gather_from_tensor_parallel_region(logits, ps.tp_group).argmax(dim=-1).cpu()
        for i, (a, t) in enumerate(rows):
            n = len(a)
            hits = predicted[i, n : n + len(t)].tolist()
            ok = sum(int(p == q) for p, q in zip(hits, t))
            tokens_ok += ok
            tokens_all += len(t)
            correct += int(ok == len(t))
    count = len(examples)
    return {
        "accuracy": correct / count if count else 0.0,
        "token_accuracy": tokens_ok / tokens_all if tokens_all else 0.0,
        "count": float(count),
    }
