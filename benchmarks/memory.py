"""Peak memory per rank of one training forward + backward, with and without each memory lever.

glm-large shape (H 1024, 16 heads, vocab 30592) at seq 2048, TP=2 on gloo CPU processes, GLM's dropouts
(0.1), ``--dtype`` parameters (default bf16), one micro-batch of ``--batch`` GLM samples (Part B = the loss
rows, about half).
``--layers`` (default 2 of the 24) keeps the run short; the per-layer figure is
``(peak(L) - peak(L/2)) / (L/2)`` measured in the same run, and the 24-layer figure is extrapolated from it.

From the profiler's allocation events (:func:`megatron_glm.testing.peak_memory`): "activations" = tensor
memory the forward leaves for backward; "peak" = the highest tensor memory during forward + backward above
what was live before (parameters and the batch not counted; gradients counted). Every option's loss is
printed next to it.

    python benchmarks/memory.py                    # TP=2, seq 2048, 2 layers
    python benchmarks/memory.py --tp 1 --seq 512   # smaller
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from megatron_glm.config import build_config
from megatron_glm.model import GLMModel
from megatron_glm.parallel import initialize_parallel_state
from megatron_glm.testing import peak_memory, run_distributed

OPTIONS: dict[str, dict[str, object]] = {
    "today (head on loss rows)": {},
    "fused chunked head": {"head_chunk_size": 1024},
    "selective recompute": {"recompute_granularity": "selective"},
    "full recompute": {"checkpoint_activations": True},
    "sequence parallel": {"sequence_parallel": True},
    "fused + selective + SP": {
        "head_chunk_size": 1024,
        "recompute_granularity": "selective",
        "sequence_parallel": True,
    },
    "fused + full + SP": {"head_chunk_size": 1024, "checkpoint_activations": True, "sequence_parallel": True},
}


def glm_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
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


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _measure(rank: int, world: int, layers: int, seq: int, batch: int, names: list[str], dtype: str) -> dict:
    ps = initialize_parallel_state(tp_size=world)
    torch.set_num_threads(1)
    base = build_config({"model.size": "glm-large"}).model
    data = glm_batch(batch, seq, base.vocab_size)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        row = {}
        for n_layers in (layers // 2, layers):
            fields = {k: v for k, v in OPTIONS[name].items() if k in {f.name for f in dataclasses.fields(base)}}
            cfg = dataclasses.replace(base, num_layers=n_layers, max_sequence_length=seq, **fields)
            model = GLMModel(cfg, ps, seed=1, params_dtype=DTYPES[dtype]).train()
            torch.manual_seed(3)  # the same hidden-dropout masks for every option (attention's: the model's seed)

            def forward(model: GLMModel = model) -> torch.Tensor:
                return model(
                    data["ids"], data["pos"], data["sep"], labels=data["labels"], loss_mask=data["loss_mask"]
                ).loss

            fwd_peak, kept, loss = peak_memory(forward)
            bwd_peak, _, _ = peak_memory(loss.backward)
            row[f"act{n_layers}"] = float(kept)  # what the forward leaves for backward
            row[f"peak{n_layers}"] = float(max(fwd_peak, kept + bwd_peak))
            row[f"loss{n_layers}"] = float(loss.detach())
            del model
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="even; the per-layer figure uses layers/2 too")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument(
        "--dtype",
        default="bf16",
        choices=tuple(DTYPES),
        help="parameter dtype (fp32 on CPUs without bf16 matmul units, where bf16 is very slow)",
    )
    ap.add_argument("--options", nargs="*", default=list(OPTIONS), help=f"any of {list(OPTIONS)}")
    args = ap.parse_args()
    if args.layers < 2 or args.layers % 2:
        ap.error("--layers must be even and >= 2")
    known = {f.name for f in dataclasses.fields(build_config({}).model)}
    names = [n for n in args.options if set(OPTIONS[n]) <= known]
    skipped = sorted(set(args.options) - set(names))
    results = run_distributed(_measure, args.tp, args.layers, args.seq, args.batch, names, args.dtype, timeout=3000.0)[
        0
    ]
    half = args.layers // 2
    print(
        f"glm-large shape, seq {args.seq}, batch {args.batch}, TP={args.tp}, {args.dtype}, dropout 0.1; "
        f"MiB per rank (rank 0) of forward + backward; {half} and {args.layers} layers measured"
    )
    print(f"{'':>28} {'--- activations ---':>32}  {'--- peak fwd+bwd ---':>32}")
    head = f" {str(args.layers) + 'L':>7} {'/layer':>7} {'24L':>7} {'saved':>7}  "
    print(f"{'option':>28}" + head * 2 + f"{'loss':>9}")
    ref: dict[str, float] = {}
    for name in names:
        r, cells = results[name], []
        for kind in ("act", "peak"):
            per_layer = (r[f"{kind}{args.layers}"] - r[f"{kind}{half}"]) / half
            est = r[f"{kind}{args.layers}"] + per_layer * (24 - args.layers)
            ref.setdefault(kind, est)
            cells.append(
                f" {r[f'{kind}{args.layers}'] / 2**20:7.0f} {per_layer / 2**20:7.0f} {est / 2**20:7.0f} "
                f"{100 * (1 - est / ref[kind]):6.1f}%  "
            )
        print(f"{name:>28}" + "".join(cells) + f"{r[f'loss{args.layers}']:9.5f}")
    print("MiB; 24L = the measured model plus (24 - layers) x the per-layer figure; saved = vs the first row")
    if skipped:
        print(f"not available in this tree: {skipped}")


if __name__ == "__main__":
    main()
