"""Fill the blanks of prompts with a trained GLM: ``[MASK]`` (words), ``[sMASK]`` (sentences), ``[gMASK]``
(long text; appended when a prompt has no blank).

Usage::

    python tools/generate.py --load runs/quickstart/checkpoints --prompt "Return the [MASK] of the list."
    python tools/generate.py --load CKPT --prompt-file prompts.txt --num-beams 4 --max-new-tokens 32
    python tools/generate.py --load CKPT --interactive --temperature 0.8 --top-k 40 --top-p 0.9
    torchrun --nproc_per_node 2 tools/generate.py --load CKPT --prompt "..."      # tensor parallel 2

``--load`` is a training save directory (newest complete ``global_stepN``), a ``global_stepN`` directory,
or a standalone export. The tokenizer defaults to the one the checkpoint was trained with. Prints one
filled text per prompt; ``--no-kv-cache`` recomputes the whole sequence at every step (same output,
slower).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist

from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.dtypes import DTYPES, SHORT_NAMES
from megatron_glm.errors import GLMError, run_cli
from megatron_glm.generation import GenerationConfig, InfillTokens, encode_prompt, fill_text, generate
from megatron_glm.generation.loading import init_inference, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (training save dir, global_stepN, export)")
    p.add_argument("--tokenizer-model", default="", help="sentencepiece model (default: the checkpoint's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    src.add_argument("--prompt-file", help="one prompt per line ('-': standard input)")
    src.add_argument("--interactive", action="store_true", help="read prompts from the terminal")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--num-beams", type=int, default=0, help="beam search with this many beams")
    mode.add_argument("--sample", action="store_true", help="sample (implied by --temperature/--top-k/--top-p)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling probability mass")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer per blank (default 32)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the full sequence at every step")
    p.add_argument("--dtype", choices=SHORT_NAMES, default="fp32", help="parameter dtype (default fp32)")
    p.add_argument("--show-tokens", action="store_true", help="also print each blank's answer token ids")
    return p.parse_args(argv)


def generation_config(args: argparse.Namespace, tokenizer: GLMTokenizer, vocab_rows: int) -> GenerationConfig:
    sampling = args.sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if sampling and args.greedy:
        raise GLMError("--greedy does not combine with --temperature/--top-k/--top-p")
    if sampling and args.num_beams:
        raise GLMError("--num-beams does not combine with --temperature/--top-k/--top-p")
    strategy = "beam" if args.num_beams else ("sample" if sampling else "greedy")
    padding = tuple(range(tokenizer.vocab_size, vocab_rows))  # padded embedding rows are not tokens
    return GenerationConfig(
        strategy=strategy,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature or 1.0,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
        num_beams=max(1, args.num_beams),
        length_penalty=args.length_penalty,
        seed=args.seed,
        use_cache=not args.no_kv_cache,
        banned_ids=padding,
    )


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


def read_prompts(args: argparse.Namespace):
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
    args = parse_args(argv)
    if args.batch_size < 1:
        raise GLMError("--batch-size must be >= 1")
    ps, device = init_inference()
    model, meta = load_model(args.load, ps, device=device, dtype=DTYPES[args.dtype])
    tokenizer_path = args.tokenizer_model or meta.get("config", {}).get("data", {}).get("tokenizer_model", "")
    if not tokenizer_path:
        raise GLMError("the checkpoint does not name its tokenizer: pass --tokenizer-model")
    tokenizer = GLMTokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GLMError(
            f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size} rows: wrong --tokenizer-model?"
        )
    config = generation_config(args, tokenizer, model.config.vocab_size)
    tokens = InfillTokens.from_tokenizer(tokenizer)
    speak = ps.tp_rank == 0 and ps.dp_rank == 0
    for texts in read_prompts(args):
        prompts = [encode_prompt(tokenizer, t, tokens) for t in texts]
        for result in generate(model, prompts, tokens, config, ps):
            if speak:
                print(fill_text(tokenizer, result, tokens), flush=True)
                if args.show_tokens:
                    print(f"  answers: {result.answers}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
