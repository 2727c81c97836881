"""Time from SIGTERM (to the torchrun agent, as SLURM / ``scancel`` send it) to a verified ``latest``.

    python benchmarks/sigterm_save.py --work /tmp/sigterm_bench [--num-layers 12 --hidden-size 1024 --nproc 2]

Builds the pydoc corpus and a tokenizer under ``--work`` (once), starts ``torchrun pretrain_glm.py`` (TP =
``--nproc``, fp32, ZeRO-1: a checkpoint of 16 bytes per parameter), sends SIGTERM to the agent after the
first logged step, and reports the seconds until ``latest`` names the new checkpoint and it verifies against
its manifest (sizes and sha256), with the checkpoint's size. torchrun gives its workers 30 s after SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_glm.checkpoint.manager import verify_checkpoint  # noqa: E402
from megatron_glm.testing import find_free_port  # noqa: E402


def tool(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True)


def corpus(work: Path) -> tuple[str, str]:
    if not (work / "pydoc_text_sentence.idx").exists():
        jsonl, prefix = str(work / "pydoc.jsonl"), str(work / "tok")
        tool("tools/export_pydoc_corpus.py", "--output", jsonl)
        tool("tools/train_tokenizer.py", "--input", jsonl, "--vocab-size", "2000", "--model-prefix", prefix)
        tool("tools/preprocess_data.py", "--input", jsonl, "--tokenizer-model", f"{prefix}.model",
             "--output-prefix", str(work / "pydoc"), "--split-sentences", "--workers", "1")  # fmt: skip
    return str(work / "pydoc_text_sentence"), str(work / "tok.model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--num-layers", type=int, default=12)
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--nproc", type=int, default=2)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    data, tok = corpus(a.work)
    save = a.work / "run"
    if save.exists():
        subprocess.run(["rm", "-rf", str(save)], check=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(a.nproc), "--master_port", str(find_free_port()), "pretrain_glm.py",
           "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size), "--num-attention-heads", "16",
           "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "100000",
           "--tensor-model-parallel-size", str(a.nproc), "--data-path", data, "--tokenizer-model", tok,
           "--model.vocab_size", "2048", "--log-interval", "1", "--eval-interval", "0", "--zero-stage", "1",
           "--save", str(save), "--save-interval", "100000"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (a.work / "console.txt").open("w")
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not ((save / "metrics.jsonl").exists() and (save / "metrics.jsonl").read_text().strip()):
            assert job.poll() is None, (a.work / "console.txt").read_text()[-3000:]
            time.sleep(0.05)
        sent = time.monotonic()
        job.send_signal(signal.SIGTERM)
        latest = save / "latest"
        while not latest.is_file():  # written after the rename of a complete, manifested checkpoint
            assert job.poll() is None, (a.work / "console.txt").read_text()[-3000:]
            time.sleep(0.02)
        took = time.monotonic() - sent
        job.wait(timeout=120)
        exited = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    step = save / latest.read_text().strip()
    start = time.monotonic()
    problem = verify_checkpoint(step)  # every file's size and sha256 against the manifest
    assert problem is None, problem
    size = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    print(json.dumps({"checkpoint": step.name, "gb": round(size / 1e9, 2), "sigterm_to_latest_s": round(took, 1),
                      "sigterm_to_exit_s": round(exited, 1), "torchrun_rc": job.returncode,
                      "verify_s": round(time.monotonic() - start, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
