"""Speed and memory of the fused chunked head + cross entropy against the unfused head, in one run.

The head of a training step on the loss rows: ``n`` rows of ``H`` through the tied ``[V, H]`` head into the
fp32 cross entropy, forward + backward. Unfused: logits ``[n, V]`` then ``vocab_parallel_cross_entropy``
(what ``model.head_chunk_size: 0`` runs); fused: ``fused_head_cross_entropy`` in chunks of ``--chunk``
rows. Rounds are interleaved (shared CPUs are noisy); medians and the ratio are printed, then the peak
tensor memory of each (:func:`megatron_glm.testing.peak_memory`).

    python benchmarks/head_loss.py                   # glm-base head: 1024 rows x 768 -> 30592, fp32
    python benchmarks/head_loss.py --dtype bf16      # on CPUs with bf16 matmul units
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_glm.parallel import fused_head_cross_entropy, vocab_parallel_cross_entropy
from megatron_glm.testing import peak_memory

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=30592)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.rows, args.hidden, generator=g).to(dtype).requires_grad_()
    w = (0.02 * torch.randn(args.vocab, args.hidden, generator=g)).to(dtype).requires_grad_()
    target = torch.randint(0, args.vocab, (args.rows,), generator=g)
    weights = torch.ones(args.rows)

    def unfused() -> float:
        loss = (vocab_parallel_cross_entropy(h @ w.t(), target) * weights).sum() / args.rows
        loss.backward()
        return float(loss.detach())

    def fused() -> float:
        total, _ = fused_head_cross_entropy(h, w, target, weights, chunk=args.chunk)
        loss = total / args.rows
        loss.backward()
        return float(loss.detach())

    fns = {"unfused": unfused, "fused": fused}
    losses = {k: fn() for k, fn in fns.items()}  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, fn in fns.items():
            h.grad = w.grad = None
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(
        f"head {args.rows} rows x {args.hidden} -> {args.vocab}, {args.dtype}, chunk {args.chunk}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds"
    )
    for k in fns:
        h.grad = w.grad = None
        peak, _, _ = peak_memory(fns[k])
        print(
            f"{k:>8}: {med[k] * 1e3:8.1f} ms fwd+bwd (min {min(times[k]) * 1e3:.1f}, max {max(times[k]) * 1e3:.1f})"
            f"  peak {peak / 2**20:7.1f} MiB  loss {losses[k]:.6f}"
        )
    print(f"fused / unfused: speed {med['unfused'] / med['fused']:.2f}x")


if __name__ == "__main__":
    main()
