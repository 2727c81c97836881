"""Tokens/s and MFU of a glm-2b-shaped training step on one CUDA GPU, for each attention kernel.

glm-2b shape (H 2048, 32 heads, vocab 50304), ``--layers`` of its 36 layers (default 4: the step is
then the head plus 4 layers), seq ``--seq`` (2048), bf16 parameters, fused chunked head on the loss rows
(Part B, about half the tokens), AdamW. MFU = model FLOPs (``flops_per_token``, head on the loss rows only)
per second / the device's bf16 peak as training logs it (the datasheet's dense figure for a known GPU, else
a matmul measured; the measured matmul is printed as well). Compilation (flex) is in the warm-up steps.

    python benchmarks/gpu_step.py                      # sdpa, flex, eager
    python benchmarks/gpu_step.py --kernels flex --compile
    python benchmarks/gpu_step.py --kernels sdpa --deterministic   # what --deterministic costs
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks.memory import glm_batch
from megatron_glm.config import build_config
from megatron_glm.model import GLMModel, flops_per_token
from megatron_glm.model.compile import compile_layers
from megatron_glm.training.determinism import apply_determinism
from megatron_glm.training.throughput import device_peak_flops, matmul_peak_flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kernels", nargs="*", default=["sdpa", "flex", "eager"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the layers too")
    ap.add_argument("--deterministic", action="store_true", help="deterministic kernels, as --deterministic")
    args = ap.parse_args()
    apply_determinism(args.deterministic)  # before the first CUDA matmul
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py needs a CUDA device")
    base = build_config({"model.size": "glm-2b"}).model
    data = {k: v.cuda() for k, v in glm_batch(args.batch, args.seq, base.vocab_size).items()}
    loss_rows = int(data["loss_mask"].sum())
    tokens = args.batch * args.seq
    head = 3 * 2 * base.hidden_size * base.vocab_size
    flops = flops_per_token(dataclasses.replace(base, num_layers=args.layers), args.seq) * tokens
    flops -= head * (tokens - loss_rows)
    peak, source = device_peak_flops(torch.bfloat16, torch.device("cuda", torch.cuda.current_device()))
    measured = matmul_peak_flops(torch.bfloat16, "cuda", n=8192, seconds=1.0)
    print(
        f"{torch.cuda.get_device_name()}: MFU peak {peak / 1e12:.0f} TFLOP/s bf16 ({source}); bf16 matmul "
        f"measured {measured / 1e12:.0f} TFLOP/s; glm-2b shape, {args.layers} layers, {args.batch} x {args.seq} "
        f"tokens ({loss_rows} loss rows), compile {args.compile}, deterministic {args.deterministic}"
    )
    for kernel in args.kernels:
        cfg = dataclasses.replace(
            base,
            num_layers=args.layers,
            max_sequence_length=args.seq,
            attention_impl=kernel,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            head_chunk_size=4096,
        )
        model = GLMModel(cfg, device="cuda", params_dtype=torch.bfloat16).train()
        if args.compile:
            compile_layers(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(model: GLMModel = model, opt: torch.optim.Optimizer = opt) -> None:
            res = model(data["ids"], data["pos"], data["sep"], labels=data["labels"], loss_mask=data["loss_mask"])
            res.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        print(
            f"{kernel:>6}: {sec * 1e3:7.1f} ms/step  {tokens / sec:9.0f} tokens/s  "
            f"MFU {100 * flops / sec / peak:5.1f}%  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            f"  (warm-up {warm:.1f} s)"
        )
        del model, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
