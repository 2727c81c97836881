"""``tools/generate.py``'s typed options: what to load and read (:class:`GenerateRun`) and how to decode (the
``generation`` section, which builds the engine's :class:`GenerationConfig`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from megatron_glm.config.sections import opt, opt_from
from megatron_glm.dtypes import SHORT_NAMES
from megatron_glm.errors import ConfigError
from megatron_glm.generation.sampling import GenerationConfig


@dataclasses.dataclass(kw_only=True)
class GenerateOptions:
    """How to decode (the ``generation`` section). ``greedy``, ``sample`` and ``num_beams`` exclude each
    other; setting ``temperature``, ``top_k`` or ``top_p`` means sampling. Greedy is the default."""

    greedy: bool = opt(False, "Argmax decoding (the default when nothing else is asked for).")
    sample: bool = opt(False, "Sample (implied by temperature / top_k / top_p).")
    num_beams: int = opt(0, "Beam search with this many beams (0: no beam search).")
    temperature: float = opt_from(
        GenerationConfig, "temperature", default=0.0, note="0: not set (1.0); setting it means sampling."
    )
    top_k: int = opt_from(GenerationConfig, "top_k", note="Setting it (> 0) means sampling.")
    top_p: float = opt_from(GenerationConfig, "top_p", default=0.0, note="0: not set (1.0); setting it means sampling.")
    length_penalty: float = opt_from(GenerationConfig, "length_penalty")
    max_new_tokens: int = opt_from(GenerationConfig, "max_new_tokens")
    seed: int = opt_from(GenerationConfig, "seed")
    use_cache: bool = opt_from(GenerationConfig, "use_cache")

    def build(self, banned_ids: Sequence[int] = ()) -> GenerationConfig:
        """The engine's config; conflicting choices are one-line :class:`ConfigError`\\ s."""
        sampling = self.sample or self.temperature != 0.0 or self.top_k != 0 or self.top_p != 0.0
        modes = [name for name, on in (("--greedy", self.greedy), ("--num-beams", self.num_beams)) if on]
        if self.sample:
            modes.append("--sample")
        if len(modes) > 1:
            raise ConfigError(f"{' and '.join(modes)} exclude each other (pick one decoding strategy)")
        if sampling and self.greedy:
            raise ConfigError("--greedy does not combine with --temperature/--top-k/--top-p")
        if sampling and self.num_beams:
            raise ConfigError("--num-beams does not combine with --temperature/--top-k/--top-p")
        if self.num_beams < 0:
            raise ConfigError(f"--num-beams must be >= 0, got {self.num_beams}")
        return GenerationConfig(
            strategy="beam" if self.num_beams else ("sample" if sampling else "greedy"),
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature or 1.0,
            top_k=self.top_k,
            top_p=self.top_p or 1.0,
            num_beams=max(1, self.num_beams),
            length_penalty=self.length_penalty,
            seed=self.seed,
            use_cache=self.use_cache,
            banned_ids=tuple(banned_ids),
        )


@dataclasses.dataclass(kw_only=True)
class GenerateRun:
    """``tools/generate.py``'s options: the checkpoint, where prompts come from, and the decoding section."""

    load: str = opt(
        "",
        "Checkpoint directory (training save dir: newest complete global_stepN; a global_stepN; an export).",
        required=True,
    )
    tokenizer_model: str = opt(
        "", "Tokenizer (sentencepiece, tokenizer.json or folder, tiktoken; empty: the checkpoint's)."
    )
    prompt: list[str] = opt([], "Prompts (several values, or repeat the flag for a batch).")
    prompt_file: str = opt("", "One prompt per line ('-': standard input).")
    interactive: bool = opt(False, "Read prompts from the terminal.")
    batch_size: int = opt(8, "Prompts per batch.")
    dtype: str = opt("fp32", "Parameter dtype.", choices=SHORT_NAMES)
    show_tokens: bool = opt(False, "Also print each blank's answer token ids.")
    causal: bool = opt(
        False,
        "Continue each prompt causally in GLM-4's format ([gMASK]<sop> + the prompt, causal attention, 1-D "
        "positions) until end of text or max_new_tokens, as transformers' generate does, instead of filling blanks.",
    )
    generation: GenerateOptions = dataclasses.field(default_factory=GenerateOptions)

    def check(self) -> None:
        """One-line :class:`ConfigError` unless exactly one prompt source is given and the batch is >= 1."""
        given = [flag for flag, on in (("--prompt", self.prompt), ("--prompt-file", self.prompt_file)) if on]
        if self.interactive:
            given.append("--interactive")
        if len(given) != 1:
            found = f" (got {', '.join(given)})" if given else ""
            raise ConfigError(f"give exactly one of --prompt, --prompt-file, --interactive{found}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")


#: ``tools/generate.py``'s flag spellings -> (dotted path, constant for valueless flags or None).
GENERATE_FLAGS: dict[str, tuple[str, object]] = {
    **{
        f"--{name.replace('_', '-')}": (name, None) for name in ("load", "tokenizer_model", "prompt_file", "batch_size")
    },
    "--prompt": ("prompt", None),
    "--interactive": ("interactive", True),
    "--dtype": ("dtype", None),
    "--show-tokens": ("show_tokens", True),
    "--causal": ("causal", True),
    **{
        f"--{name.replace('_', '-')}": (f"generation.{name}", None)
        for name in ("num_beams", "temperature", "top_k", "top_p", "length_penalty", "max_new_tokens", "seed")
    },
    "--greedy": ("generation.greedy", True),
    "--sample": ("generation.sample", True),
    "--no-kv-cache": ("generation.use_cache", False),
}
