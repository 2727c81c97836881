"""``--cpu-allocator heap`` (the default on CPU) against ``system`` (glibc's defaults): ``pretrain_glm.py``'s step
time and peak resident set, for a dense model and a GLM-4.5-shaped MoE one, in one run.

Builds the embedded corpus, a tokenizer and the dataset in a temporary directory (or ``--work``, kept), then
trains each model a few steps with each allocator (one process per run, allocators interleaved), and prints the
median step time after ``--warmup`` steps, the ratio system / heap, and the peak RSS of each
(``megatron_glm.training.cpu_allocator`` says what ``heap`` changes).

    python benchmarks/cpu_allocator.py                 # H 512, 4 layers, seq 512, micro-batch 8, 10 steps
    python benchmarks/cpu_allocator.py --steps 20 --rounds 2
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
MODELS = {"dense": "", "moe 64e top-8": "--num-experts 64 --moe-top-k 8 --moe-intermediate-size 128 --moe-router-bias"}
SHAPE = (
    "--num-layers 4 --hidden-size 512 --num-attention-heads 8 --swiglu --disable-bias-linear --normalization RMSNorm "
    "--position-embedding-type rope --log-interval 1 --eval-interval 0 --save-interval 100000"
)


def tool(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def prepare(work: Path) -> tuple[str, str]:
    """(dataset prefix, tokenizer) of the embedded corpus in ``work`` (built once)."""
    corpus, prefix, tok = str(work / "pydoc.jsonl"), work / "pydoc_text_sentence", str(work / "tok.model")
    if not Path(f"{prefix}.idx").exists():
        tool("tools/export_pydoc_corpus.py", "--output", corpus)
        tool("tools/train_tokenizer.py", "--input", corpus, "--vocab-size", "4000", "--model-prefix", str(work / "tok"))
        tool(
            *("tools/preprocess_data.py", "--input", corpus, "--tokenizer-model", tok),
            *("--output-prefix", str(work / "pydoc"), "--split-sentences", "--workers", "2"),
        )
    return str(prefix), tok


def train(work: Path, data: tuple[str, str], extra: str, allocator: str, a: argparse.Namespace) -> list[dict]:
    """One ``pretrain_glm.py`` run; its metrics records with a step time."""
    save = Path(tempfile.mkdtemp(dir=work, prefix=f"run_{allocator}_"))
    cmd = [sys.executable, "pretrain_glm.py", "--data-path", data[0], "--tokenizer-model", data[1], *SHAPE.split()]
    cmd += extra.split()
    cmd += ["--seq-length", str(a.seq_length), "--micro-batch-size", str(a.micro_batch), "--global-batch-size"]
    cmd += [str(a.micro_batch), "--train-iters", str(a.steps), "--save", str(save), "--cpu-allocator", allocator]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pretrain_glm.py failed ({allocator}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step_time_s" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--work", default="", help="keep the corpus and runs here (default: a temporary directory)")
    a = p.parse_args()
    if a.steps <= a.warmup:
        raise SystemExit(f"--steps {a.steps}: more than --warmup {a.warmup} needed")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = prepare(work)
        print(
            f"pretrain_glm.py, 4 layers, H 512, seq {a.seq_length}, micro-batch {a.micro_batch}, fp32, "
            f"{os.cpu_count()} cores; median step time of steps {a.warmup + 1}-{a.steps}, {a.rounds} round(s)"
        )
        for name, extra in MODELS.items():
            times: dict[str, list[float]] = {"system": [], "heap": []}
            peak: dict[str, float] = {}
            for _ in range(a.rounds):
                for allocator in times:
                    rows = train(work, data, extra, allocator, a)
                    times[allocator] += [r["step_time_s"] for r in rows if r["step"] > a.warmup]
                    peak[allocator] = max(peak.get(allocator, 0.0), rows[-1]["peak_mem_mb"])
            system, heap = statistics.median(times["system"]), statistics.median(times["heap"])
            print(
                f"{name}: system {system:.2f} s/step (peak RSS {peak['system']:.0f} MiB), heap {heap:.2f} s/step "
                f"(peak RSS {peak['heap']:.0f} MiB): heap {system / heap:.2f}x faster, "
                f"{peak['heap'] / peak['system']:.2f}x the peak RSS"
            )
    print(f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
