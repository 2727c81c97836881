"""Deterministic beam search over all blanks of one prompt.

A hypothesis is the whole fill: the answers of blanks 1..j so far. Each of the ``num_beams`` live
hypotheses feeds one token per step (as in :mod:`megatron_glm.generation.infill`); its score is the sum of
the log-probabilities of every token it chose, ``[eop]`` included. An ``[eop]`` that closes a blank which
is not the last moves the hypothesis to the next blank's ``[sop]``; one that closes the last blank
finishes it, with score ``sum log p / length ** length_penalty`` (``length``: tokens generated,
``[eop]`` included). At each step the ``2 * num_beams`` best continuations are examined in order;
search stops once ``num_beams`` hypotheses are finished (HF's ``early_stopping=True``) and returns the
best. With ``no_repeat_ngram_size`` a token that would repeat an n-gram of its blank's answer is excluded.
Ties are broken by ``torch.topk``'s order, so the result is a pure function of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_glm.generation.decoder import Stepper, agree
from megatron_glm.generation.prompt import InfillResult, InfillTokens
from megatron_glm.generation.sampling import GenerationConfig, ban, ban_repeats, banned_ids
from megatron_glm.parallel import ParallelState


@dataclass
class _Hypothesis:
    current: int
    count: int
    answers: list[list[int]]
    feed: tuple[int, int, int]
    score: float


def beam_search(
    model: torch.nn.Module,
    prompt: list[int],
    blanks: list[int],
    tokens: InfillTokens,
    config: GenerationConfig,
    parallel_state: ParallelState,
) -> InfillResult:
    """The best fill of ``prompt``'s ``blanks`` found by beam search (``config.num_beams`` beams)."""
    ps = parallel_state
    width, limit = config.num_beams, config.max_new_tokens
    stepper = Stepper(
        model, [prompt], tokens.pad, use_cache=config.use_cache, parallel_state=ps, capacity=len(blanks) * (limit + 1)
    )
    stepper.prefill()
    stepper.reorder([0] * width)
    start = _Hypothesis(0, 0, [[] for _ in blanks], (tokens.sop, blanks[0], 1), 0.0)
    beams = [start] + [_Hypothesis(0, 0, [[] for _ in blanks], start.feed, float("-inf")) for _ in range(width - 1)]
    finished: list[tuple[float, float, list[list[int]]]] = []
    banned: torch.Tensor | None = None
    for step in range(len(blanks) * (limit + 1)):
        tok, pos, bpos = torch.tensor([h.feed for h in beams], dtype=torch.long).unbind(1)
        logits = stepper.step(tok, pos, bpos)
        if banned is None:
            banned = banned_ids(config, logits.shape[-1], logits.device)
        logp = torch.log_softmax(ban(logits, banned), dim=-1)
        logp = ban_repeats(logp, [h.answers[h.current] for h in beams], config.no_repeat_ngram_size)
        for r, h in enumerate(beams):
            if h.count >= limit:  # answer full: [eop] is forced
                logp[r] = float("-inf")
                logp[r, tokens.eop] = 0.0
        scores = torch.tensor([h.score for h in beams], dtype=logp.dtype, device=logp.device)
        cand = (scores[:, None] + logp).flatten()
        k = min(2 * width, cand.numel())
        index = agree(torch.topk(cand, k).indices, ps)
        values = cand[index].tolist()
        vocab = logp.shape[-1]
        survivors: list[_Hypothesis] = []
        parents: list[int] = []
        for value, flat in zip(values, index.tolist()):
            if value == float("-inf") or len(survivors) == width:
                break
            r, t = divmod(flat, vocab)
            h = beams[r]
            answers = [list(a) for a in h.answers]
            if t == tokens.eop:
                if h.current + 1 == len(blanks):
                    finished.append((value / (step + 1) ** config.length_penalty, value, answers))
                    continue
                nxt = h.current + 1
                survivors.append(_Hypothesis(nxt, 0, answers, (tokens.sop, blanks[nxt], 1), value))
            else:
                answers[h.current].append(t)
                survivors.append(
                    _Hypothesis(h.current, h.count + 1, answers, (t, blanks[h.current], h.count + 2), value)
                )
            parents.append(r)
        if len(finished) >= width or not survivors:
            break
        stepper.reorder(parents)
        beams = survivors
    if not finished:  # cannot happen: every hypothesis ends within the step bound; keep the best live one
        finished = [(h.score, h.score, h.answers) for h in beams]
    norm, _, answers = max(finished, key=lambda f: f[0])  # max keeps the first of equal scores
    return InfillResult(list(prompt), list(blanks), answers, score=norm, extra={"steps": stepper.steps})
