"""Training-step throughput of GLM on CPU in bf16: tokens/s and MFU, against a naive implementation.

One step = forward + backward + AdamW on one micro-batch (``--batch`` x ``--seq`` tokens) of a
glm-base-shaped model (H 768, 12 heads, 4H MLP, vocab 30592; ``--layers`` of them, default 4 instead of
12 to keep the run short). MFU = model FLOPs (``flops_per_token``: matmuls, dense attention, head; 3x
forward) per second / a bf16 matmul peak measured in the same run. ``--loss-positions`` runs our head on the
loss (Part B) rows only, as ``pretrain_glm.py`` does, and then counts head FLOPs on those rows only.

The reference ("naive") is the original GLM step, :class:`benchmarks.original_glm.OriginalGLM` (plain
``nn.Linear`` layers, eager attention with a materialised additive ``[b, 1, s, s]`` mask and fp32 softmax,
full-vocabulary logits, ``torch.optim.AdamW`` defaults) with the same initial weights.

    python benchmarks/model_step.py                # both models, prints MFU and the ratio
    python benchmarks/model_step.py --no-compile   # our model without torch.compile
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.original_glm import OriginalGLM, original_loss
from megatron_glm.config import build_config
from megatron_glm.model import (
    GLMModel,
    compiled_glm_loss,
    flops_per_token,
    glm_loss,
    glm_loss_at,
    loss_positions,
)
from megatron_glm.training.throughput import matmul_peak_flops


def make_batch(batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sep = torch.randint(seq // 4, 3 * seq // 4, (batch,), generator=g)
    pos = torch.zeros(batch, 2, seq, dtype=torch.long)
    loss_mask = torch.zeros(batch, seq)
    for i, n in enumerate(sep.tolist()):
        pos[i, 0, :n] = torch.arange(n)
        pos[i, 0, n:] = n // 2
        pos[i, 1, n:] = torch.arange(1, seq - n + 1)
        loss_mask[i, n:] = 1
    return {
        "ids": torch.randint(0, vocab, (batch, seq), generator=g),
        "pos": pos,
        "sep": sep,
        "labels": torch.randint(0, vocab, (batch, seq), generator=g),
        "loss_mask": loss_mask,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (each: peak sample, our step, naive step)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--no-compile", action="store_true", help="do not torch.compile the layers and the loss")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument(
        "--loss-positions",
        action="store_true",
        help="run our head on the loss positions only, as pretrain_glm.py does (MFU then counts the "
        "head on those rows only, for both models)",
    )
    ap.add_argument(
        "--head-chunk",
        type=int,
        default=0,
        help="with --loss-positions: the fused chunked head + loss (model.head_chunk_size) in chunks of "
        "this many rows (0: unfused)",
    )
    ap.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp32"),
        help="parameters and matmul peak (fp32 on CPUs without bf16 matmul units)",
    )
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = build_config({"model.size": "glm-base"}).model
    cfg = dataclasses.replace(
        cfg,
        num_layers=args.layers,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_impl=args.attention,
        head_chunk_size=args.head_chunk,
    )
    batch = make_batch(args.batch, args.seq, cfg.vocab_size)
    tokens = args.batch * args.seq
    # Model FLOPs: every layer and the head on every token (the standard count); with --loss-positions the
    # head (3 x 2 H V per row) only on the rows the loss needs. Both models are measured against the same work.
    loss_tokens = int(batch["loss_mask"].sum())
    head = 3 * 2 * cfg.hidden_size * cfg.vocab_size
    flops = flops_per_token(cfg, args.seq) * tokens
    if args.loss_positions:
        flops -= head * (tokens - loss_tokens)
    where = "loss" if args.loss_positions else "all"
    print(
        f"glm-base shape, {args.layers} layers, batch {args.batch} x seq {args.seq} ({loss_tokens} loss tokens), "
        f"{args.dtype} params, {args.threads} threads, attention {args.attention}, compile {not args.no_compile}, "
        f"head on {where} positions (fused chunks {args.head_chunk or 'off'}); {flops / 1e9:.0f} model GFLOP/step; "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    model = GLMModel(cfg, params_dtype=dtype).train()
    loss_fn = glm_loss
    if not args.no_compile:
        model.compile_layers()
        loss_fn = compiled_glm_loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    positions = loss_positions(batch["loss_mask"])
    loss_at = glm_loss_at if args.no_compile else torch.compile(glm_loss_at, dynamic=True)

    def step() -> None:
        if not args.loss_positions:
            logits = model(batch["ids"], batch["pos"], batch["sep"])
            loss_fn(logits, batch["labels"], batch["loss_mask"]).loss.backward()
        elif args.head_chunk:
            model(
                batch["ids"], batch["pos"], batch["sep"], labels=batch["labels"], loss_mask=batch["loss_mask"]
            ).loss.backward()
        else:
            logits = model(batch["ids"], batch["pos"], batch["sep"], logit_positions=positions)
            loss_at(logits, positions, batch["labels"], batch["loss_mask"]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    naive = OriginalGLM(
        args.layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size, cfg.max_sequence_length + 1
    ).to(dtype)
    naive.load_state_dict(model.state_dict())
    naive.train()
    nopt = torch.optim.AdamW(naive.parameters(), lr=1e-4)

    def naive_step() -> None:
        original_loss(naive(batch["ids"], batch["pos"], batch["sep"]), batch["labels"], batch["loss_mask"]).backward()
        nopt.step()
        nopt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    step()
    print(f"first step (includes compilation): {time.perf_counter() - t:.1f} s")
    for _ in range(args.warmup):
        step()
        if not args.skip_naive:
            naive_step()
    # Interleave peak samples and both models so they see the same machine load (shared CPUs are noisy).
    peaks, ours, theirs = [], [], []
    for _ in range(args.steps):
        peaks.append(matmul_peak_flops(dtype, "cpu", n=2048, seconds=0.3))
        ours.append(timed(step))
        if not args.skip_naive:
            theirs.append(timed(naive_step))
    peak = median(peaks)
    print(
        f"{args.dtype} matmul peak (median of {len(peaks)} samples): {peak / 1e9:.0f} GFLOP/s "
        f"(min {min(peaks) / 1e9:.0f}, max {max(peaks) / 1e9:.0f})"
    )
    fast = median(ours)
    report("megatron_glm", fast, tokens, flops, peak)
    if theirs:
        slow = median(theirs)
        report("naive", slow, tokens, flops, peak)
        print(f"speed-up over naive: {slow / fast:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share these cores)")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def report(name: str, seconds: float, tokens: int, flops: float, peak: float) -> None:
    print(
        f"{name:>13}: {seconds * 1e3:7.0f} ms/step  {tokens / seconds:8.0f} tokens/s  "
        f"{flops / seconds / 1e9:6.0f} GFLOP/s  MFU {100 * flops / seconds / peak:5.1f}%"
    )


if __name__ == "__main__":
    main()
