"""Blank infilling: fill every ``[MASK]`` / ``[sMASK]`` / ``[gMASK]`` of a prompt, left to right.

How a prompt is filled (GLM's own procedure, the layout it was trained on):

1. Part A is ``[CLS]`` + the prompt's tokens, blanks included (``[gMASK]`` is appended when the prompt
   has no blank: generate a continuation). It is encoded once, bidirectionally.
2. Blank ``j`` (in text order) is generated from ``[sop]``: every token of its answer gets
   position = the blank's position in Part A and block positions 1, 2, ... (``[sop]`` has 1), until the
   model emits ``[eop]`` or the answer has ``max_new_tokens`` tokens (then ``[eop]`` is forced).
3. The answer stays in the sequence as a Part B span (``[sop] x1 .. xk``, the ``[eop]`` is not fed, as
   in training) and the next blank starts with its own ``[sop]``: later blanks attend to all of Part A
   and to every earlier answer.

Batches of prompts of different lengths are padded (see :mod:`megatron_glm.generation.decoder`); rows
that are done keep feeding ``[pad]`` until the batch is done. Under tensor parallelism every rank
computes the same full-vocabulary logits and takes tensor-parallel rank 0's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megatron_glm.errors import GLMError
from megatron_glm.generation.beam import beam_search
from megatron_glm.generation.decoder import Stepper, agree
from megatron_glm.generation.prompt import InfillResult, InfillTokens, blank_positions
from megatron_glm.generation.sampling import GenerationConfig, ban, ban_repeats, banned_ids, next_tokens
from megatron_glm.parallel import ParallelState


def _check(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], tokens: InfillTokens, config: GenerationConfig
) -> list[list[int]]:
    if not prompts:
        raise GLMError("no prompt to fill")
    max_seq = model.config.max_sequence_length
    if config.max_new_tokens + 1 > max_seq:
        raise GLMError(
            f"max_new_tokens {config.max_new_tokens} needs block positions up to "
            f"{config.max_new_tokens + 1}, but the model has {max_seq} positions"
        )
    blanks = []
    for i, p in enumerate(prompts):
        if len(p) > max_seq:
            raise GLMError(f"prompt {i} has {len(p)} tokens; the model has {max_seq} positions")
        found = blank_positions(p, tokens)
        if not found:
            raise GLMError(f"prompt {i} has no blank ([MASK], [sMASK] or [gMASK])")
        blanks.append(found)
    return blanks


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    tokens: InfillTokens,
    config: GenerationConfig,
    parallel_state: ParallelState | None = None,
) -> list[InfillResult]:
    """Fill the blanks of every prompt (token ids, ``[CLS]`` first: see :func:`encode_prompt`).

    Greedy and sampling run the prompts as one padded batch; beam search runs them one at a time.
    Collective under tensor parallelism (every rank calls it with the same prompts and config).
    """
    blanks = _check(model, prompts, tokens, config)
    ps = parallel_state or getattr(model, "parallel_state", None) or ParallelState()
    was_training = model.training
    model.eval()
    try:
        if config.strategy == "beam":
            return [beam_search(model, list(p), b, tokens, config, ps) for p, b in zip(prompts, blanks)]
        return _sample(model, [list(p) for p in prompts], blanks, tokens, config, ps)
    finally:
        model.train(was_training)


def _sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    blanks: list[list[int]],
    tokens: InfillTokens,
    config: GenerationConfig,
    parallel_state: ParallelState,
) -> list[InfillResult]:
    """Greedy / sampling over a padded batch, one token per row per step."""
    ps = parallel_state
    b, limit = len(prompts), config.max_new_tokens
    stepper = Stepper(
        model,
        prompts,
        tokens.pad,
        use_cache=config.use_cache,
        parallel_state=ps,
        capacity=max(len(bl) for bl in blanks) * (limit + 1),
    )
    answers: list[list[list[int]]] = [[[] for _ in bl] for bl in blanks]
    current, count, done = [0] * b, [0] * b, [False] * b
    feed = [[tokens.sop, bl[0], 1] for bl in blanks]
    generator = None
    if config.strategy == "sample":
        generator = torch.Generator(device=stepper.device).manual_seed(config.seed)
    banned: torch.Tensor | None = None
    for _ in range(max(len(bl) for bl in blanks) * (limit + 1)):
        tok, pos, bpos = torch.tensor(feed, dtype=torch.long).unbind(1)
        logits = stepper.step(tok, pos, bpos)
        if banned is None:
            banned = banned_ids(config, logits.shape[-1], logits.device)
        current_answers = [[] if done[i] else answers[i][current[i]] for i in range(b)]
        logits = ban_repeats(ban(logits, banned), current_answers, config.no_repeat_ngram_size)
        chosen = agree(next_tokens(logits, config, generator), ps).tolist()
        for i in range(b):
            if done[i]:
                continue
            t = chosen[i] if count[i] < limit else tokens.eop
            if t == tokens.eop:
                current[i] += 1
                count[i] = 0
                if current[i] == len(blanks[i]):
                    done[i], feed[i] = True, [tokens.pad, 0, 0]
                else:
                    feed[i] = [tokens.sop, blanks[i][current[i]], 1]
            else:
                answers[i][current[i]].append(t)
                count[i] += 1
                feed[i] = [t, blanks[i][current[i]], count[i] + 1]
        if all(done):
            break
    return [InfillResult(p, bl, a, extra={"steps": stepper.steps}) for p, bl, a in zip(prompts, blanks, answers)]


def fill_text(tokenizer: Any, result: InfillResult, tokens: InfillTokens | None = None) -> str:
    """The filled prompt as text (without the leading ``[CLS]``)."""
    tokens = tokens or InfillTokens.from_tokenizer(tokenizer)
    ids = result.filled()
    if ids and ids[0] == tokens.cls:
        ids = ids[1:]
    return tokenizer.decode(ids)
