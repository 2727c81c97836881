"""Generation throughput with and without the KV cache: tokens/s for ``--new-tokens`` (256) new tokens.

A GLM of ``--layers`` x ``--hidden`` (default 4 x 512, 8 heads, vocab 30592: a small glm-base-like shape)
with random weights fills one ``[gMASK]`` after a ``--prompt-length`` token prompt, greedily; ``[eop]`` is
banned so both runs generate exactly ``--new-tokens`` tokens. The cached run encodes the prompt once and
runs one token per step; the reference recomputes the whole sequence at every step. Both must produce the
same tokens (checked). Prints tokens/s of each and the ratio (goal: >= 5x at 256 tokens).

    python benchmarks/generate.py                      # CPU, 1 thread
    python benchmarks/generate.py --threads 2 --layers 12 --hidden 768
    python benchmarks/generate.py --device cuda --dtype bf16
    python benchmarks/generate.py --load runs/quickstart/checkpoints   # a trained checkpoint instead
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from megatron_glm.config import build_config
from megatron_glm.dtypes import DTYPES, SHORT_NAMES
from megatron_glm.generation import GenerationConfig, InfillTokens, generate
from megatron_glm.model import GLMModel


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=30592)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="prompts generated together")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=SHORT_NAMES, default="fp32")
    p.add_argument("--load", default="", help="benchmark a checkpoint instead of a random model")
    return p.parse_args()


def build(args: argparse.Namespace) -> GLMModel:
    if args.load:
        from megatron_glm.generation.loading import load_model

        model, _ = load_model(args.load, device=args.device, dtype=DTYPES[args.dtype])
        return model
    cfg = build_config(
        {
            "model.num_layers": args.layers,
            "model.hidden_size": args.hidden,
            "model.num_attention_heads": args.heads,
            "model.vocab_size": args.vocab,
            "model.max_sequence_length": max(512, args.prompt_length + 1, args.new_tokens + 2),
        }
    ).model
    cfg = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)
    return GLMModel(cfg, seed=1, params_dtype=DTYPES[args.dtype], device=args.device).eval()


def run(
    model: GLMModel, prompts: list[list[int]], tokens: InfillTokens, config: GenerationConfig
) -> tuple[float, list[list[int]]]:
    if model.parameters().__next__().device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = generate(model, prompts, tokens, config)
    if model.parameters().__next__().device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, [r.answers[0] for r in results]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = build(args)
    vocab = model.config.vocab_size
    ids = [vocab - k for k in range(1, 9)]  # command tokens taken from the top rows
    tokens = InfillTokens(
        pad=ids[1],
        eos=ids[1],
        cls=ids[0],
        mask=ids[5],
        smask=ids[6],
        gmask=ids[4],
        sop=ids[2],
        eop=ids[3],
        dblock=ids[7],
    )
    g = torch.Generator().manual_seed(0)
    prompts = [
        [tokens.cls, *torch.randint(0, vocab - 16, (args.prompt_length - 2,), generator=g).tolist(), tokens.gmask]
        for _ in range(args.batch)
    ]
    common = dict(max_new_tokens=args.new_tokens, banned_ids=tuple(ids))
    cached = GenerationConfig(use_cache=True, **common)
    full = GenerationConfig(use_cache=False, **common)
    run(
        model, [[*p[:16], tokens.gmask] for p in prompts], tokens, dataclasses.replace(cached, max_new_tokens=8)
    )  # warm-up
    t_cache, out_cache = run(model, prompts, tokens, cached)
    t_full, out_full = run(model, prompts, tokens, full)
    new = sum(len(a) for a in out_cache)
    if out_cache != out_full:
        print("warning: cached and recomputed generations differ (numerical ties?)")
    shape = "checkpoint " + args.load if args.load else f"{args.layers} layers x {args.hidden}, vocab {vocab}"
    print(
        f"model: {shape}; {args.device} {args.dtype}, {args.threads} thread(s); batch {args.batch}, "
        f"prompt {args.prompt_length} tokens, {args.new_tokens} new tokens each"
    )
    print(f"with KV cache:    {new / t_cache:9.1f} tokens/s ({t_cache:.2f} s)")
    print(f"full recompute:   {new / t_full:9.1f} tokens/s ({t_full:.2f} s)")
    print(f"ratio: {t_full / t_cache:.1f}x (goal >= 5x); outputs identical: {out_cache == out_full}")


if __name__ == "__main__":
    main()
