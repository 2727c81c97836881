"""Does splitting each GLM sample into its dense attention regions beat SDPA with a boolean mask on CPU?

GLM's mask has two dense regions per sample: Part A queries see Part A keys (no mask at all), Part B
queries see every key up to their own position (a causal mask aligned to the bottom right,
``torch.nn.attention.bias.causal_lower_right``). Split: two SDPA calls per sample, the masked-out
Part A x Part B block never computed. Reference: one SDPA call with the ``[b, 1, s, s]`` boolean mask.
Forward + backward, rounds interleaved; the outputs are checked equal first.

    python benchmarks/attention_regions.py               # 4 x 12 heads x 512 x 64, fp32
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megatron_glm.model import sep_to_mask


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sep: list[int]) -> torch.Tensor:
    s = q.shape[2]
    outs = []
    for n, a in enumerate(sep):
        part_a = F.scaled_dot_product_attention(q[n : n + 1, :, :a], k[n : n + 1, :, :a], v[n : n + 1, :, :a])
        part_b = F.scaled_dot_product_attention(
            q[n : n + 1, :, a:], k[n : n + 1], v[n : n + 1], attn_mask=causal_lower_right(s - a, s)
        )
        outs.append(torch.cat([part_a, part_b], dim=2))
    return torch.cat(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))
    sep = torch.randint(args.seq // 4, 3 * args.seq // 4, (args.batch,), generator=g)
    mask = sep_to_mask(sep, args.seq)
    fns = {
        "sdpa + bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "dense regions": lambda: split_attention(q, k, v, sep.tolist()),
    }
    torch.testing.assert_close(fns["dense regions"](), fns["sdpa + bool mask"](), rtol=0, atol=1e-5)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn().sum().backward()
            times[name].append(time.perf_counter() - t)
    med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    print(f"{args.batch} x {args.heads} heads x {args.seq} x {args.head_dim}, fp32, fwd+bwd, {args.rounds} rounds")
    for name, sec in med.items():
        print(f"{name:>17}: {sec * 1e3:8.1f} ms (min {min(times[name]) * 1e3:.1f})")
    print(f"dense regions / sdpa: {med['sdpa + bool mask'] / med['dense regions']:.2f}x")


if __name__ == "__main__":
    main()
