"""Task evaluation on a model: cloze scoring, seq2seq generation, overlapping-window perplexity.

Perplexity of a raw text (Wikitext-style, GLM's ``--overlapping-eval``): the text's tokens ``t`` are cut
into windows; each window is laid out as a document blank,

    Part A: [CLS] t[c0 .. c1) [gMASK]       (the ``overlap`` tokens before the new ones, as context)
    Part B: [sop] t[c1 .. e-1)              predicting t[c1 .. e)

so every token is predicted exactly once, with up to ``overlap`` earlier tokens of context (the first
window has none). Reported: ``ppl_token = exp(nll / tokens)`` and ``ppl_word = exp(nll / words)``
(words: whitespace-separated pieces of the text), as GLM reports Wikitext103.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.finetune.config import FinetuneConfig
from megatron_glm.finetune.encode import (
    TaskDataset,
    TaskEncoder,
    encode_examples,
    glm_row,
    num_choices,
    stack_rows,
    task_batches,
)
from megatron_glm.finetune.loss import TaskLoss
from megatron_glm.finetune.metrics import classification_metrics, generation_metrics
from megatron_glm.finetune.tasks import Seq2SeqExample, read_task_file
from megatron_glm.generation import GenerationConfig, generate
from megatron_glm.model.loss import glm_loss
from megatron_glm.parallel import ParallelState


def generation_config(cfg: FinetuneConfig, tokenizer: Any, vocab_rows: int) -> GenerationConfig:
    """Beam search (or greedy with one beam) as configured; padded vocabulary rows and the command tokens
    that cannot be part of an answer are never generated."""
    commands = (
        tokenizer.pad_id,
        tokenizer.cls_id,
        tokenizer.mask_id,
        tokenizer.smask_id,
        tokenizer.gmask_id,
        tokenizer.sop_id,
    )
    banned = tuple(range(tokenizer.vocab_size, vocab_rows)) + commands
    return GenerationConfig(
        strategy="beam" if cfg.num_beams > 1 else "greedy",
        max_new_tokens=cfg.target_length,
        num_beams=cfg.num_beams,
        length_penalty=cfg.length_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        banned_ids=banned,
    )


@torch.no_grad()
def generate_targets(
    model: torch.nn.Module,
    encoder: TaskEncoder,
    examples: Sequence[Seq2SeqExample],
    config: GenerationConfig,
    ps: ParallelState | None = None,
) -> list[str]:
    """The generated target text of every example (collective under tensor parallelism)."""
    tokenizer = encoder.tokenizer
    prompts = [encoder.part_a(ex.source, ex.line) for ex in examples]
    if not prompts:
        return []
    results = generate(model, prompts, encoder.tokens, config, ps)
    return [tokenizer.decode(r.answers[0]).strip() for r in results]


@torch.no_grad()
def evaluate_rows(
    model: torch.nn.Module,
    dataset: TaskDataset,
    loss: TaskLoss,
    *,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> tuple[torch.Tensor, float, float]:
    """``(cloze confusion [label, prediction], loss sum, loss count)`` over this data-parallel rank's share of
    a held-out :class:`TaskDataset` (the count is examples for cloze, target tokens for seq2seq)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    loss.pop_counts()
    per_step = micro_batch_size * dp_size
    steps = -(-dataset.num_examples // per_step)
    batches = task_batches(
        dataset, consumed_samples=0, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size
    )
    total = count = 0.0
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        out = loss.forward(model, batch)
        total += float(out.sample_sum.sum())
        count += float(out.sample_tokens.sum())
    model.train(was)
    return loss.pop_counts(), total, count


def perplexity_windows(num_tokens: int, window: int, overlap: int) -> list[tuple[int, int, int]]:
    """``(context start, first new token, end)`` per window: new tokens ``[c1, e)`` cover ``0..num_tokens``
    exactly once; ``window`` is the row length, which holds [CLS], [gMASK] and [sop] besides the tokens."""
    if window < 4 or not 0 <= overlap <= window - 4:
        raise ValueError(f"need window >= 4 and 0 <= overlap <= window - 4, got window {window}, overlap {overlap}")
    out, start = [], 0
    while start < num_tokens:
        context = min(overlap, start)
        end = min(num_tokens, start + window - 2 - context)
        out.append((start - context, start, end))
        start = end
    return out


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    ids: Sequence[int],
    words: int,
    *,
    window: int,
    overlap: int,
    batch_size: int = 8,
    ps: ParallelState | None = None,
) -> dict[str, float]:
    """``nll`` (sum), ``tokens``, ``words``, ``loss``, ``ppl_token``, ``ppl_word`` of token ``ids``."""
    ps = ps or getattr(model, "parallel_state", None) or ParallelState()
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    rows = []
    for c0, c1, e in perplexity_windows(len(ids), window, overlap):
        part_a = [tokenizer.cls_id, *ids[c0:c1], tokenizer.gmask_id]
        rows.append(
            glm_row(
                part_a, len(part_a) - 1, list(ids[c1:e]), start=tokenizer.sop_id, length=window, pad=tokenizer.pad_id
            )
        )
    nll = tokens = 0.0
    for i in range(0, len(rows), batch_size):
        batch = {k: torch.from_numpy(v).to(device) for k, v in stack_rows(rows[i : i + batch_size]).items()}
        logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
        out = glm_loss(logits, batch["labels"], batch["loss_mask"], ps)
        nll += float(out.sample_sum.sum())
        tokens += float(out.sample_tokens.sum())
    model.train(was)
    loss = nll / tokens if tokens else float("nan")
    return {
        "nll": nll,
        "tokens": tokens,
        "words": float(words),
        "loss": loss,
        "ppl_token": math.exp(min(loss, 50.0)),
        "ppl_word": math.exp(min(nll / max(words, 1), 50.0)),
    }


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: FinetuneConfig,
    path: str,
    *,
    micro_batch_size: int = 8,
    ps: ParallelState | None = None,
) -> dict[str, float]:
    """Zero-shot (or any checkpoint's) task metrics on a task file, one process or tensor parallel:
    cloze ``accuracy`` (``f1_macro`` when all examples share their choices), ``count``, ``valid_loss``;
    seq2seq ``valid_loss``, ``rouge1``, ``rouge2``, ``rougeL``, ``bleu``, ``count``."""
    ps = ps or getattr(model, "parallel_state", None) or ParallelState()
    examples = read_task_file(path, cfg.task)
    choices = num_choices(examples) if cfg.task == "cloze" else 1
    encoder = TaskEncoder(tokenizer, cfg, path)
    dataset = TaskDataset(
        encode_examples(encoder, examples, cfg.task, choices),
        rows_per_example=choices,
        seq_length=cfg.seq_length,
        pad=tokenizer.pad_id,
        shuffle=False,
    )
    loss = TaskLoss(cfg.task, ps, num_choices=choices, scoring=cfg.cloze_scoring)
    confusion, total, count = evaluate_rows(model, dataset, loss, micro_batch_size=micro_batch_size)
    out: dict[str, float] = {"valid_loss": total / count if count else float("nan")}
    if cfg.task == "cloze":
        out.update(classification_metrics(confusion, classes=len({ex.choices for ex in examples}) == 1))
        return out
    chosen = examples[: cfg.eval_generate or None]
    vocab_rows = model.config.vocab_size
    texts = generate_targets(model, encoder, chosen, generation_config(cfg, tokenizer, vocab_rows), ps)
    out.update(generation_metrics(texts, [ex.target for ex in chosen]))
    return out


def gather_strings(values: list[tuple[int, str]], group: Any = None) -> list[tuple[int, str]]:
    """All ranks' ``(index, text)`` pairs (each index once), sorted; no-op on one process."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return sorted(values)
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, values, group=group)
    return sorted({i: s for part in parts for i, s in part}.items())
