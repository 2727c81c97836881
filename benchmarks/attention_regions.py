"""Does splitting each GLM sample into its dense attention regions beat SDPA with a boolean mask on CPU?

GLM's mask per sample (Part A length ``a``): every query sees the Part A keys (no mask), and a Part B query
also sees the earlier Part B keys (a causal square). Two ways to compute only those regions:

- ``lower-right``: per sample, Part A queries x Part A keys (SDPA, no mask) and Part B queries x every key with
  ``torch.nn.attention.bias.causal_lower_right`` (on CPU that bias takes SDPA's math path);
- ``merged flash``: per sample, every query x the Part A keys and the Part B queries x the Part B keys (causal),
  both through the CPU flash kernel, merged by their log-sum-exps; the backward runs the flash backward of each
  piece with the merged output and log-sum-exp (the split-KV rule), so the masked Part A x Part B block is
  never computed in either direction.

Reference: one SDPA call with the ``[b, 1, s, s]`` boolean mask. Forward + backward, rounds interleaved; every
variant's output and gradients are checked against the reference first (fp32). ``--seps`` are the Part A lengths
(default: the four samples of each real batch in ``benchmarks/glm_step.py``).

    python benchmarks/attention_regions.py                    # 4 x 12 heads x 512 x 64, bf16
    python benchmarks/attention_regions.py --dtype fp32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_glm.dtypes import DTYPES
from megatron_glm.model import sep_to_mask

#: The Part A lengths of the token, sentence and document batches glm_step.py draws from the pydoc corpus.
REAL_SEPS = ([414, 419, 420, 420], [420, 395, 420, 344], [227, 130, 127, 328])


def lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sep: list[int]) -> torch.Tensor:
    s = q.shape[2]
    outs = []
    for n, a in enumerate(sep):
        part_a = F.scaled_dot_product_attention(q[n : n + 1, :, :a], k[n : n + 1, :, :a], v[n : n + 1, :, :a])
        part_b = F.scaled_dot_product_attention(
            q[n : n + 1, :, a:], k[n : n + 1], v[n : n + 1], attn_mask=causal_lower_right(s - a, s)
        )
        outs.append(torch.cat([part_a, part_b], dim=2))
    return torch.cat(outs)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attention outputs over disjoint key sets -> the output over their union (and its log-sum-exp)."""
    lse = torch.logaddexp(l1, l2)
    w1, w2 = torch.exp(l1 - lse).unsqueeze(-1), torch.exp(l2 - lse).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype), lse


class MergedFlash(torch.autograd.Function):
    """Per sample: all queries x Part A keys, Part B queries x Part B keys (causal), merged (CPU flash kernel)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sep: list[int]) -> torch.Tensor:
        s = q.shape[2]
        outs, lses = [], []
        for n, a in enumerate(sep):
            qn, kn, vn = q[n : n + 1], k[n : n + 1], v[n : n + 1]
            o, lse = _flash(qn, kn[:, :, :a], vn[:, :, :a])
            if a < s:
                o2, l2 = _flash(qn[:, :, a:], kn[:, :, a:], vn[:, :, a:], is_causal=True)
                ob, lb = _merge(o[:, :, a:], lse[:, :, a:], o2, l2)
                o, lse = torch.cat([o[:, :, :a], ob], 2), torch.cat([lse[:, :, :a], lb], 2)
            outs.append(o)
            lses.append(lse)
        out, lse = torch.cat(outs), torch.cat(lses)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sep = sep
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        s = q.shape[2]
        for n, a in enumerate(ctx.sep):
            qn, kn, vn, on, ln, gn = (t[n : n + 1] for t in (q, k, v, out, lse, grad))
            g = _flash_backward(gn, qn, kn[:, :, :a], vn[:, :, :a], on, ln, 0.0, False)
            dq[n : n + 1] += g[0]
            dk[n : n + 1, :, :a] += g[1]
            dv[n : n + 1, :, :a] += g[2]
            if a < s:
                b = slice(a, None)
                g = _flash_backward(
                    gn[:, :, b], qn[:, :, b], kn[:, :, b], vn[:, :, b], on[:, :, b], ln[:, :, b], 0.0, True
                )
                dq[n : n + 1, :, b] += g[0]
                dk[n : n + 1, :, b] += g[1]
                dv[n : n + 1, :, b] += g[2]
        return dq, dk, dv, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--seps", type=str, default=None, help="comma-separated Part A lengths (one batch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [[int(x) for x in args.seps.split(",")]] if args.seps else [list(s) for s in REAL_SEPS]
    dtype = DTYPES[args.dtype]
    print(f"{args.heads} heads x {args.seq} x {args.head_dim}, {args.dtype}, fwd+bwd, {args.rounds} rounds")
    for sep in batches:
        g = torch.Generator().manual_seed(0)
        shape = (len(sep), args.heads, args.seq, args.head_dim)
        q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
        mask = sep_to_mask(torch.tensor(sep), args.seq)
        fns = {
            "sdpa + bool mask": lambda q, k, v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
            "lower-right": lambda q, k, v, a=sep: lower_right(q, k, v, a),
            "merged flash": lambda q, k, v, a=sep: MergedFlash.apply(q, k, v, a),
        }
        # Equal to the reference in fp32 (output and every gradient) before timing.
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        go = torch.randn(shape, generator=g)
        ref = fns["sdpa + bool mask"](q32, k32, v32)
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), go)
        for name, fn in fns.items():
            out = fn(q32, k32, v32)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=name)
            for a, b in zip(torch.autograd.grad(out, (q32, k32, v32), go), ref_grads, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(q, k, v).sum().backward()
                times[name].append(time.perf_counter() - t)
        med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        ref_t = med["sdpa + bool mask"]
        print(f"sep {sep}: " + "; ".join(f"{n} {t * 1e3:.1f} ms ({ref_t / t:.2f}x)" for n, t in med.items()))


if __name__ == "__main__":
    main()
