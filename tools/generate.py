"""Fill the blanks of prompts with a trained GLM: ``[MASK]`` (words), ``[sMASK]`` (sentences), ``[gMASK]``
(long text; appended when a prompt has no blank).

Usage::

    python tools/generate.py --load runs/quickstart/checkpoints --prompt "Return the [MASK] of the list."
    python tools/generate.py --load CKPT --prompt-file prompts.txt --num-beams 4 --max-new-tokens 32
    python tools/generate.py --load CKPT --interactive --temperature 0.8 --top-k 40 --top-p 0.9
    python tools/generate.py --load glm4-hf --causal --prompt "The capital of France is"   # GLM-4 style
    torchrun --nproc_per_node 2 tools/generate.py --load CKPT --prompt "..."      # tensor parallel 2

``--load`` is a training save directory (newest complete ``global_stepN``), a ``global_stepN`` directory,
or a standalone export. The tokenizer defaults to the one the checkpoint was trained with. Prints one
filled text per prompt; ``--no-kv-cache`` recomputes the whole sequence at every step (same output,
slower). Options may also come from ``--config FILE.yaml`` (keys as listed by ``--help``) and dotted
flags (``--generation.top_k 40``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist

from megatron_glm.config import help_text, load_config
from megatron_glm.data.tokenizer import open_tokenizer
from megatron_glm.dtypes import DTYPES
from megatron_glm.errors import GLMError, run_cli
from megatron_glm.generation import InfillTokens, encode_prompt, fill_text, generate
from megatron_glm.generation.causal import continuation_text, continue_causal, encode_causal_prompt
from megatron_glm.generation.loading import init_inference, load_model
from megatron_glm.generation.options import GENERATE_FLAGS, GenerateRun
from megatron_glm.tokens import stop_token_ids


def parse_args(argv: list[str]) -> GenerateRun:
    """The typed options from the command line (flags, ``--config FILE.yaml``, dotted paths)."""
    run = load_config(argv, root=GenerateRun, aliases=GENERATE_FLAGS)
    run.check()
    run.generation.build()  # conflicting decoding flags fail before the model is loaded
    return run


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _ask() -> str | None:
    try:
        return input("prompt> ")
    except EOFError:
        return None


def _from_rank0(read):
    """``read()`` on global rank 0, shared with every rank (the others wait for it)."""
    box = [read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_prompts(args: GenerateRun):
    """Batches of prompts (lists of strings) from the flags, a file or the terminal."""
    if args.prompt:
        lines = args.prompt
    elif args.prompt_file:

        def read() -> str:
            if args.prompt_file == "-":
                return sys.stdin.read()
            try:
                with open(args.prompt_file, encoding="utf-8") as stream:
                    return stream.read()
            except OSError as exc:
                raise GLMError(f"{args.prompt_file}: cannot read prompts ({exc.strerror})") from None

        text = _from_rank0(read) if _distributed() else read()
        lines = [line for line in text.splitlines() if line.strip()]
    else:
        while True:
            line = _from_rank0(_ask) if _distributed() else _ask()
            if line is None:
                return
            if line.strip():
                yield [line]
    for i in range(0, len(lines), args.batch_size):
        yield lines[i : i + args.batch_size]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(help_text(GenerateRun, GENERATE_FLAGS))
        return 0
    args = parse_args(argv)
    ps, device = init_inference()
    model, meta = load_model(args.load, ps, device=device, dtype=DTYPES[args.dtype])
    tokenizer_path = args.tokenizer_model or meta.get("config", {}).get("data", {}).get("tokenizer_model", "")
    if not tokenizer_path:
        raise GLMError("the checkpoint does not name its tokenizer: pass --tokenizer-model")
    tokenizer = open_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GLMError(
            f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size} rows: wrong --tokenizer-model?"
        )
    padding = range(tokenizer.vocab_size, model.config.vocab_size)  # padded embedding rows are not tokens
    config = args.generation.build(banned_ids=padding)
    tokens = None if args.causal else InfillTokens.from_tokenizer(tokenizer)  # causal: no [CLS] needed
    speak = ps.tp_rank == 0 and ps.dp_rank == 0
    for texts in read_prompts(args):
        if tokens is None:
            prompts = [encode_causal_prompt(tokenizer, t) for t in texts]
            results = continue_causal(model, prompts, tokenizer.pad_id, stop_token_ids(tokenizer), config, ps)
        else:
            results = generate(model, [encode_prompt(tokenizer, t, tokens) for t in texts], tokens, config, ps)
        for result in results:
            if speak:
                text = continuation_text(tokenizer, result) if tokens is None else fill_text(tokenizer, result, tokens)
                print(text, flush=True)
                if args.show_tokens:
                    print(f"  answers: {result.answers}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
