"""Causal continuation in GLM-4's format: ``[gMASK]<sop>`` + the prompt's tokens, attended causally with 1-D
positions ``0, 1, ...`` (block positions 0), continued one token at a time until a stop token (end of text, GLM-4's
chat-turn markers: :func:`megatron_glm.tokens.stop_token_ids`) or ``max_new_tokens``. This is how transformers'
``GlmForCausalLM.generate`` runs a GLM-4 prompt, so greedy decoding gives its tokens.

The prompt but its last token is Part A (:class:`~megatron_glm.generation.decoder.Stepper` with a causal Part A);
the last token is the first one fed, so each row's next-token logits come from its own last position whatever the
padding of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megatron_glm.errors import GLMError
from megatron_glm.generation.decoder import Stepper, agree
from megatron_glm.generation.prompt import InfillResult
from megatron_glm.generation.sampling import GenerationConfig, ban, ban_repeats, banned_ids, next_tokens
from megatron_glm.parallel import ParallelState


def encode_causal_prompt(tokenizer: Any, text: str) -> list[int]:
    """``[gMASK]``, ``<sop>``, then the tokens of ``text`` (GLM-4's prompt start)."""
    return [tokenizer.gmask_id, tokenizer.sop_id, *tokenizer.encode(text)]


def _check(model: torch.nn.Module, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> None:
    if not prompts:
        raise GLMError("no prompt to continue")
    if config.strategy == "beam":
        raise GLMError("causal continuation decodes greedily or by sampling (no beam search)")
    max_seq = model.config.max_sequence_length
    for i, p in enumerate(prompts):
        if len(p) < 2 or len(p) + config.max_new_tokens > max_seq:
            raise GLMError(
                f"prompt {i} has {len(p)} tokens: a causal prompt needs at least 2 and, with max_new_tokens "
                f"{config.max_new_tokens}, at most {max_seq} positions in all"
            )


@torch.no_grad()
def continue_causal(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    stop_ids: Sequence[int],
    config: GenerationConfig,
    parallel_state: ParallelState | None = None,
) -> list[InfillResult]:
    """Continue every prompt (token ids, e.g. from :func:`encode_causal_prompt`) as one padded batch; each result
    holds the continuation (without the stop token) as its one answer, at the blank position ``len(prompt)``.
    Collective under tensor parallelism (every rank calls it with the same prompts and config)."""
    _check(model, prompts, config)
    ps = parallel_state or getattr(model, "parallel_state", None) or ParallelState()
    was_training = model.training
    model.eval()
    try:
        stepper = Stepper(
            model, [list(p[:-1]) for p in prompts], pad_id, use_cache=config.use_cache, parallel_state=ps,
            capacity=config.max_new_tokens + 1, causal=True,
        )  # fmt: skip
        answers: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        feed = [[p[-1], len(p) - 1, 0] for p in prompts]
        generator = None
        if config.strategy == "sample":
            generator = torch.Generator(device=stepper.device).manual_seed(config.seed)
        banned: torch.Tensor | None = None
        for _ in range(config.max_new_tokens):
            tok, pos, bpos = torch.tensor(feed, dtype=torch.long).unbind(1)
            logits = stepper.step(tok, pos, bpos)
            if banned is None:
                banned = banned_ids(config, logits.shape[-1], logits.device)
            logits = ban_repeats(ban(logits, banned), answers, config.no_repeat_ngram_size)
            chosen = agree(next_tokens(logits, config, generator), ps).tolist()
            for i, p in enumerate(prompts):
                if not done[i] and chosen[i] in stop_ids:
                    done[i] = True
                if done[i]:
                    feed[i] = [pad_id, 0, 0]
                    continue
                answers[i].append(chosen[i])
                feed[i] = [chosen[i], len(p) + len(answers[i]) - 1, 0]
            if all(done):
                break
    finally:
        model.train(was_training)
    return [InfillResult(list(p), [len(p)], [a], extra={"steps": stepper.steps}) for p, a in zip(prompts, answers)]


def continuation_text(tokenizer: Any, result: InfillResult) -> str:
    """The prompt's text (without ``[gMASK]<sop>``) followed by its continuation."""
    return tokenizer.decode(result.prompt[2:] + result.answers[0])
