"""Blank-infilling generation (KV cache, greedy / sampling / beam search) and evaluation."""

from megatron_glm.generation.beam import beam_search
from megatron_glm.generation.decoder import Stepper, infill_mask
from megatron_glm.generation.infill import fill_text, generate
from megatron_glm.generation.kv_cache import KVCache
from megatron_glm.generation.prompt import InfillResult, InfillTokens, blank_positions, encode_prompt
from megatron_glm.generation.sampling import GenerationConfig, filter_logits, next_tokens

__all__ = [
    "GenerationConfig",
    "InfillResult",
    "InfillTokens",
    "KVCache",
    "Stepper",
    "beam_search",
    "blank_positions",
    "encode_prompt",
    "fill_text",
    "filter_logits",
    "generate",
    "infill_mask",
    "next_tokens",
]
