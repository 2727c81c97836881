"""Step time of pipeline parallelism (PP=2 on 2 processes) against PP=1 (1 process) on the same model.

Builds the quick-start data if missing (embedded pydoc corpus), then runs pretrain_glm.py twice with the
same global batch of ``--micro-batches`` micro-batches and prints the median step times, the speed-up and
the bubble fraction the 1F1B schedule predicts, ``(p - 1) / (m + p - 1)``.

    python benchmarks/pipeline.py [--layers 8 --hidden 256 --seq 128 --micro-batches 8 --steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def ensure_data(out: Path) -> tuple[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "pydoc_text_sentence.idx").exists():
        subprocess.run([PY, "tools/export_pydoc_corpus.py", "--output", str(out / "pydoc.jsonl")], cwd=ROOT, check=True)
        subprocess.run(
            [
                PY,
                "tools/train_tokenizer.py",
                "--input",
                str(out / "pydoc.jsonl"),
                "--vocab-size",
                "4000",
                "--model-prefix",
                str(out / "tokenizer"),
            ],
            cwd=ROOT,
            check=True,
        )
        subprocess.run(
            [
                PY,
                "tools/preprocess_data.py",
                "--input",
                str(out / "pydoc.jsonl"),
                "--tokenizer-model",
                str(out / "tokenizer.model"),
                "--output-prefix",
                str(out / "pydoc"),
                "--split-sentences",
            ],
            cwd=ROOT,
            check=True,
        )
    return str(out / "pydoc_text_sentence"), str(out / "tokenizer.model")


def run(pp: int, args: argparse.Namespace, data: tuple[str, str], save: Path) -> float:
    cmd = [
        str(Path(PY).parent / "torchrun"),
        "--nproc_per_node",
        str(pp),
        "pretrain_glm.py",
        "--num-layers",
        str(args.layers),
        "--hidden-size",
        str(args.hidden),
        "--num-attention-heads",
        "8",
        "--seq-length",
        str(args.seq),
        "--max-position-embeddings",
        str(args.seq),
        "--data-path",
        data[0],
        "--tokenizer-model",
        data[1],
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        str(2 * args.micro_batches),
        "--train-iters",
        str(args.steps),
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--pipeline-model-parallel-size",
        str(pp),
        "--save",
        str(save),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, capture_output=True)
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][2:]  # skip warm-up steps
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--data-dir", default=str(ROOT / "runs" / "quickstart"))
    args = p.parse_args()
    data = ensure_data(Path(args.data_dir))
    with tempfile.TemporaryDirectory() as tmp:
        t1 = run(1, args, data, Path(tmp) / "pp1")
        t2 = run(2, args, data, Path(tmp) / "pp2")
    m, stages = args.micro_batches, 2
    bubble = (stages - 1) / (m + stages - 1)
    print(f"model: {args.layers} layers, hidden {args.hidden}, seq {args.seq}; {m} micro-batches of 2 per step")
    print(f"PP=1 (1 process): {t1:.3f} s/step")
    print(f"PP=2 (2 processes): {t2:.3f} s/step")
    print(
        f"speed-up PP=2 vs PP=1: {t1 / t2:.2f}x (ideal without bubble: 2.00x; 1F1B bubble (p-1)/(m+p-1) = "
        f"{bubble:.1%}, so at best {2 * (1 - bubble):.2f}x)"
    )


if __name__ == "__main__":
    main()
