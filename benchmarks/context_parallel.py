"""Context parallelism: step time and peak activation memory per rank at CP 1 and 2 for the same global sequence.

One training forward + backward of a GLM batch (Part B = the loss rows, about half) of ``--seq`` tokens, at CP=1
(one process) and CP=2 (two gloo processes on CPU, each rank holding the zigzag half of every sequence, keys and
values passed around the ring or all-gathered: ``--comm``, ``both`` for a CP=2 row each), GLM's dropouts
(``--dropout``, default 0.1; attention dropout always gathers). ``--cuda`` (under ``torchrun --nproc_per_node 2``,
one GPU per rank, NCCL): each rank measures CP=1 alone on its GPU, then the two ranks CP=2.

Memory (CPU: the profiler's allocation events, :func:`megatron_glm.testing.peak_memory`; CUDA: the allocator's
peak): "activations" = the tensor memory the forward leaves for backward; "peak" = the highest tensor memory during
forward + backward above what was live before (parameters, their gradients from a first step, and the batch not
counted). Step time: the median of ``--steps`` forward + backward passes after one warm-up (on a shared CPU this
includes the gloo all-gathers; it is indicative only).

    python benchmarks/context_parallel.py                      # H 512, 8 heads, 2 layers, seq 2048, fp32
    python benchmarks/context_parallel.py --seq 8192 --dropout 0 --head-chunk 1024 --comm both
    torchrun --nproc_per_node 2 benchmarks/context_parallel.py --cuda --seq 32768 --hidden 1024 --heads 16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import glm_batch as memory_batch
from megatron_glm.config import build_config
from megatron_glm.model import GLMModel
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.context_parallel import ContextParallel, reduce_loss, split_batch
from megatron_glm.testing import peak_memory, run_distributed

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def glm_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """benchmarks/memory.py's GLM samples (Part A of a random length in [S/4, 3S/4), Part B the loss rows), keyed
    as the trainer's batches."""
    data = memory_batch(batch, seq, vocab, seed)
    data["input_ids"], data["position_ids"] = data.pop("ids"), data.pop("pos")
    return data


def _measure(rank: int, world: int, args: argparse.Namespace) -> dict[str, float]:
    cuda = args.cuda
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    ps = initialize_parallel_state(cp_size=world) if world > 1 else ParallelState()
    base = build_config({"model.size": "glm-large"}).model
    cfg = dataclasses.replace(
        base,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        max_sequence_length=args.seq,
        hidden_dropout=args.dropout,
        attention_dropout=args.dropout,
        head_chunk_size=args.head_chunk,
        context_parallel_comm=args.comm,
    )
    model = GLMModel(cfg, ps, seed=1, params_dtype=DTYPES[args.dtype], device=device).train()
    data = glm_batch(args.batch, args.seq, cfg.vocab_size)
    cp = ContextParallel.of(ps)
    if cp is not None:
        data = split_batch(data, cp.size, cp.rank)
    data = {k: v.to(device) for k, v in data.items()}

    def forward() -> torch.Tensor:
        out = model(
            data["input_ids"], data["position_ids"], data["sep"], labels=data["labels"], loss_mask=data["loss_mask"]
        )
        return (out if cp is None else reduce_loss(out, cp)).loss

    def step() -> float:
        forward().backward()
        if cuda:
            torch.cuda.synchronize()
        return 0.0

    torch.manual_seed(3)
    step()  # warm-up; the gradients now exist (not counted below)
    times = []
    for _ in range(args.steps):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss = forward()
        kept = torch.cuda.memory_allocated(device) - before
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        fwd_peak, kept, loss = peak_memory(forward)
        bwd_peak, _, _ = peak_memory(loss.backward)
        peak = max(fwd_peak, kept + bwd_peak)
    return {"act": float(kept), "peak": float(peak), "time": statistics.median(times), "loss": float(loss.detach())}


def _summary(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(r[k] for r in results) for k in ("act", "peak", "time")} | {"loss": results[0]["loss"]}


def _with_comm(args: argparse.Namespace, comm: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "comm": comm})


def _cuda_rows(args: argparse.Namespace, comms: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Under torchrun with 2 GPUs (NCCL): CP=1 on each rank's GPU alone, then CP=2; rows on rank 0 only."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != 2:
        raise SystemExit("--cuda runs under torchrun --nproc_per_node 2 (one GPU per rank)")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    rows = {"1": _summary([_measure(rank, 1, args)])}
    for comm in comms:
        gathered: list = [None, None]
        dist.all_gather_object(gathered, _measure(rank, 2, _with_comm(args, comm)))
        rows[f"2 {comm}"] = _summary(gathered)
    dist.destroy_process_group()
    return rows if rank == 0 else {}


def _cpu_rows(args: argparse.Namespace, comms: tuple[str, ...]) -> dict[str, dict[str, float]]:
    rows = {"1": _summary(run_distributed(_measure, 1, args, timeout=3000.0))}
    for comm in comms:
        rows[f"2 {comm}"] = _summary(run_distributed(_measure, 2, _with_comm(args, comm), timeout=3000.0))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=2048, help="global sequence length (divisible by 4)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="hidden and attention dropout (0 at long sequences: CP's exact attention dropout draws [b, h, S, S])",
    )
    ap.add_argument("--cuda", action="store_true", help="run each rank on its GPU (NCCL needs one GPU per rank)")
    ap.add_argument("--head-chunk", type=int, default=0, help="model.head_chunk_size (the fused head; 0: unfused)")
    ap.add_argument(
        "--comm",
        default="ring",
        choices=("ring", "gather", "both"),
        help="model.context_parallel_comm at CP=2 (both: one CP=2 row each; attention dropout always gathers)",
    )
    args = ap.parse_args()
    if args.seq % 4:
        ap.error("--seq must be divisible by 2 x CP = 4")
    comms = ("ring", "gather") if args.comm == "both" else (args.comm,)
    rows = _cuda_rows(args, comms) if args.cuda else _cpu_rows(args, comms)
    if not rows:
        return
    print(
        f"seq {args.seq}, batch {args.batch}, H {args.hidden}, {args.heads} heads, {args.layers} layers, {args.dtype}, "
        f"dropout {args.dropout}, head chunk {args.head_chunk}; per rank (the larger of the ranks), MiB"
    )
    print(f"{'CP':>9} {'activations':>12} {'peak fwd+bwd':>13} {'step s':>8} {'loss':>10}")
    for name, r in rows.items():
        print(f"{name:>9} {r['act'] / 2**20:12.1f} {r['peak'] / 2**20:13.1f} {r['time']:8.3f} {r['loss']:10.5f}")
    one = rows["1"]
    for comm in comms:
        two = rows[f"2 {comm}"]
        print(
            f"CP=2 {comm} / CP=1: activations {two['act'] / one['act']:.3f}x, peak {two['peak'] / one['peak']:.3f}x, "
            f"step time {two['time'] / one['time']:.3f}x; loss difference {abs(two['loss'] - one['loss']):.2e}"
        )
    if len(comms) == 2:
        print(f"step time ring / gather: {rows['2 ring']['time'] / rows['2 gather']['time']:.3f}x")


if __name__ == "__main__":
    main()
