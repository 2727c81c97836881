"""Choosing the next token from full-vocabulary logits: greedy, temperature, top-k, top-p (nucleus).

Every function works on fp32 ``[b, V]`` logits. Sampling draws from an explicit ``torch.Generator`` so
that the same seed gives the same tokens on every tensor-parallel rank and every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_glm.config.sections import opt
from megatron_glm.errors import GLMError

STRATEGIES = ("greedy", "sample", "beam")


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How blanks are filled (the engine's settings; ``tools/generate.py``'s ``generation`` options build it)."""

    strategy: str = opt(
        "greedy",
        "greedy (argmax), sample (temperature / top-k / top-p) or beam (deterministic beam search).",
        choices=STRATEGIES,
    )
    max_new_tokens: int = opt(32, "Longest answer per blank (an [eop] is forced when it is reached).")
    temperature: float = opt(1.0, "Sampling temperature (> 0).")
    top_k: int = opt(0, "Sample among the k most likely tokens (0: off).")
    top_p: float = opt(1.0, "Nucleus sampling: the smallest set of tokens with this probability mass (1: off).")
    num_beams: int = opt(1, "Beams of beam search (>= 2 with strategy beam).")
    length_penalty: float = opt(1.0, "Beam search: final score = log p / length ** length_penalty.")
    seed: int = opt(1234, "Sampling seed (the same tokens on every tensor-parallel rank and every run).")
    use_cache: bool = opt(True, "KV cache; false recomputes the whole sequence at every step (same output, slower).")
    banned_ids: Sequence[int] = field(
        default_factory=tuple,
        metadata={"help": "Ids never generated (e.g. the padded vocabulary rows, or [eop] for full-length answers)."},
    )
    no_repeat_ngram_size: int = opt(0, "n > 0: no n-gram of tokens occurs twice within one blank's answer (0: off).")

    def __post_init__(self) -> None:
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        if self.strategy == "beam" and self.num_beams < 2:
            problems.append(f"beam search needs num_beams >= 2, got {self.num_beams}")
        if problems:
            raise GLMError("; ".join(problems))


def ban(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with the ``banned`` ids set to -inf (in place on a copy)."""
    if banned is None or banned.numel() == 0:
        return logits
    logits = logits.clone()
    logits[:, banned] = float("-inf")
    return logits


def repeated_ngram_tokens(answer: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an ``n``-gram already present in ``answer`` (``n <= 0``: none)."""
    if n <= 0 or len(answer) < n - 1:
        return []
    if n == 1:
        return sorted(set(answer))
    prefix = list(answer[len(answer) - n + 1 :])
    return sorted({answer[i + n - 1] for i in range(len(answer) - n + 1) if list(answer[i : i + n - 1]) == prefix})


def ban_repeats(logits: torch.Tensor, answers: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """``logits [b, V]`` with row ``r``'s :func:`repeated_ngram_tokens` of ``answers[r]`` set to -inf."""
    if n <= 0:
        return logits
    rows = [(r, repeated_ngram_tokens(a, n)) for r, a in enumerate(answers)]
    if not any(t for _, t in rows):
        return logits
    logits = logits.clone()
    for r, tokens in rows:
        if tokens:
            logits[r, tokens] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scale by ``1 / temperature`` and keep the ``top_k`` largest / the smallest set of tokens whose
    probability reaches ``top_p`` (the rest -inf). At least one token always survives."""
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """``[b]`` next tokens from fp32 ``[b, V]`` logits (banned ids already removed)."""
    if config.strategy == "greedy":
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, config.temperature, config.top_k, config.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def banned_ids(config: GenerationConfig, vocab: int, device: torch.device) -> torch.Tensor:
    """The ids ``config`` bans that exist in a vocabulary of ``vocab`` (sorted, on ``device``)."""
    ids = [i for i in config.banned_ids if 0 <= i < vocab]
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)
