"""Preprocessing throughput against raw encoding (sentencepiece, or ``tokenizers``' batch encoder for a
``tokenizer.json``), and peak memory at two input sizes.

The corpus (>= 50 MB of real, varied text) is built from Debian documentation packages::

    apt-get install -y linux-doc-6.1 python3.11-doc
    python benchmarks/preprocess.py --build-corpus data/bench.jsonl

which writes one JSONL document per file: the Linux kernel documentation (``*.rst.gz``, ~49 MB,
English plus its Chinese, Japanese, Korean and Italian translations) and the Python 3.11
documentation sources (``_sources/*.rst.txt``, ~12 MB). Then::

    python benchmarks/preprocess.py --corpus data/bench.jsonl [--tokenizer-model m.model]

trains a 32,000-piece BPE model on the first ``--train-mb`` MB if no model is given, measures
sentencepiece encoding the corpus's texts in one process (the floor), then ``preprocess`` with 1
and 2 workers (documents, and with ``--sentences`` also sentence splitting), and the peak memory
(parent and workers) for a quarter of the corpus and the whole corpus.

``--type bpe`` does the same with a byte-level BPE ``tokenizer.json`` (trained here, or ``--tokenizer-model``):
the reference is ``tokenizers``' own batch encoder (``encode_batch_fast``, batches of 256 texts) on one thread,
as each preprocessing worker runs (``TOKENIZERS_PARALLELISM=false`` is set for the whole run; the pool workers
set it themselves); ``tokenizers`` on its own thread pool (all cores) is printed last for comparison.

Wall-clock rates are only meaningful on an otherwise idle machine; the CPU-time rates (MB per CPU
second, this process plus its workers) compare the pipeline's work with raw encoding even when other
jobs share the cores.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.data.bpe_training import train_byte_bpe
from megatron_glm.data.corpus import iter_texts, write_jsonl
from megatron_glm.data.preprocess import PreprocessConfig, preprocess
from megatron_glm.data.tokenizer import open_tokenizer
from megatron_glm.data.tokenizer_training import train_sentencepiece
from megatron_glm.errors import DataError, run_cli

SOURCES = (
    "/usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz",
    "/usr/share/doc/linux-doc-*/Documentation/**/*.txt.gz",
    "/usr/share/doc/python3.*/html/_sources/**/*.rst.txt",
)


def build_corpus(path: str) -> None:
    records = []
    total = 0
    for pattern in SOURCES:
        for name in sorted(glob.glob(pattern, recursive=True)):
            opener = gzip.open if name.endswith(".gz") else open
            try:
                with opener(name, "rb") as stream:
                    text = stream.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                records.append({"id": name, "text": text})
                total += len(text.encode("utf-8"))
    if total < 50e6:
        raise DataError(
            f"only {total / 1e6:.1f} MB of text found; install it first: "
            "apt-get install -y linux-doc-6.1 python3.11-doc"
        )
    write_jsonl(path, records)
    print(f"wrote {len(records)} documents, {total / 1e6:.1f} MB of text, to {path}")


MEMORY_SCRIPT = """
import resource, sys
sys.path.insert(0, sys.argv[4])
from megatron_glm.data.preprocess import PreprocessConfig, preprocess
preprocess(PreprocessConfig(inputs=[sys.argv[1]], output_prefix=sys.argv[2], tokenizer_model=sys.argv[3],
           workers=2, split_sentences=True), log=lambda _l: None)
own = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_memory(corpus: str, model: str, workdir: str) -> tuple[int, int]:
    """(parent, largest worker) peak RSS in MiB for preprocessing ``corpus`` with 2 workers."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, corpus, os.path.join(workdir, "mem"), model, root],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]) // 1024, int(out[1]) // 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _burn(_: int) -> None:
    x = 0
    for i in range(5_000_000):
        x += i


def machine_scaling() -> float:
    """How much faster 2 processes burn 2 equal CPU loads than 1 process does, now: the most any 2-worker
    speed-up can show on a shared machine (2.0 on 2 idle cores)."""
    context = multiprocessing.get_context("fork")
    walls = []
    for processes in (1, 2):
        with context.Pool(processes) as pool:
            start = time.perf_counter()
            pool.map(_burn, range(4), chunksize=1)
            walls.append(time.perf_counter() - start)
    return walls[0] / walls[1]


def raw_rates(texts: list[str], model: str, size: int, kind: str) -> tuple[float, float]:
    """(tokens/s, tokens per CPU second) of the raw encoder, texts in memory."""
    tokenizer = open_tokenizer(model)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if kind == "bpe":
        raw = tokenizer._tok  # tokenizers' own Tokenizer, as preprocessing calls it
        raw.encode_special_tokens = True
        batches = (
            raw.encode_batch_fast(texts[k : k + 256], add_special_tokens=False) for k in range(0, len(texts), 256)
        )
        tokens = sum(len(encoding.ids) for batch in batches for encoding in batch)
    else:
        encode = tokenizer._sp.EncodeAsIds
        tokens = sum(len(encode(text)) for text in texts)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    name = "tokenizers encode_batch_fast, 1 thread" if kind == "bpe" else "sentencepiece, 1 process"
    print(
        f"raw {name}, texts in memory: {size / 1e6 / seconds:.2f} MB/s, {tokens / seconds:,.0f} tokens/s "
        f"({tokens:,} tokens); per CPU second: {size / 1e6 / cpu:.2f} MB, {tokens / cpu:,.0f} tokens"
    )
    return tokens / seconds, tokens / cpu


def preprocess_rates(
    args: argparse.Namespace, model: str, workdir: str, size: int, split: bool, raw_tps: float, raw_cpu_tps: float
) -> dict[str, float]:
    """Preprocess with 1 and 2 workers; print the rates and return the ratios to the raw encoder."""
    rates, out = {}, {}
    mode = "sentences" if split else "documents"
    for workers in (1, 2):
        config = PreprocessConfig(
            inputs=[args.corpus],
            output_prefix=os.path.join(workdir, f"w{workers}"),
            tokenizer_model=model,
            workers=workers,
            split_sentences=split,
            chunk_bytes=int(args.chunk_mb * (1 << 20)),
        )
        cpu_start = cpu_seconds()
        summary = preprocess(config, log=lambda _line: None)
        cpu = cpu_seconds() - cpu_start
        mbs = size / 1e6 / summary.seconds
        tps = summary.total_tokens / summary.seconds
        rates[workers] = tps
        out[f"{mode} {workers}w per worker (wall)"] = tps / workers / raw_tps
        out[f"{mode} {workers}w (CPU)"] = summary.total_tokens / cpu / raw_cpu_tps
        print(
            f"preprocess {mode}, {workers} worker(s): {summary.seconds:.1f}s, {mbs:.2f} MB/s, {tps:,.0f} tokens/s, "
            f"{tps / workers / raw_tps:.2f}x raw per worker (wall); {summary.total_tokens / cpu:,.0f} tokens per "
            f"CPU second = {summary.total_tokens / cpu / raw_cpu_tps:.2f}x raw"
        )
    suffix = "_text_sentence.bin" if split else "_text_document.bin"
    with open(os.path.join(workdir, "w1") + suffix, "rb") as a, open(os.path.join(workdir, "w2") + suffix, "rb") as b:
        same = a.read() == b.read()
    out[f"{mode} 2w/1w"] = rates[2] / rates[1]
    print(f"  2 workers / 1 worker: {rates[2] / rates[1]:.2f}x; identical .bin: {same}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-corpus", metavar="JSONL", help="build the benchmark corpus here and exit")
    parser.add_argument("--corpus", metavar="JSONL", help="JSONL corpus ({'text': ...} a line)")
    parser.add_argument("--type", choices=("sentencepiece", "bpe"), default="sentencepiece", help="bpe: tokenizer.json")
    parser.add_argument("--tokenizer-model", help="tokenizer (default: train a 32k BPE of --type)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--train-mb", type=float, default=8.0, help="MB of the corpus to train the tokenizer on")
    parser.add_argument("--sentences", action="store_true", help="also measure --split-sentences")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of raw and pipeline timings")
    parser.add_argument("--chunk-mb", type=float, default=8.0, help="preprocessing work unit (its default: 8)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    if args.build_corpus:
        build_corpus(args.build_corpus)
        return
    if not args.corpus:
        raise DataError("--corpus: give a JSONL corpus (or build one with --build-corpus)")
    if args.type == "bpe":
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as in each worker (see the docstring)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(workdir, exist_ok=True)
    texts = list(iter_texts([args.corpus]))
    size = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {args.corpus}: {len(texts)} documents, {size / 1e6:.1f} MB; {os.cpu_count()} cores")

    model = args.tokenizer_model
    if model is None:
        sample, taken = [], 0
        for text in texts:
            sample.append({"text": text})
            taken += len(text)
            if taken > args.train_mb * 1e6:
                break
        write_jsonl(os.path.join(workdir, "train.jsonl"), sample)
        start = time.perf_counter()
        prefix = os.path.join(workdir, "bench_bpe")
        if args.type == "bpe":
            model = prefix + ".json"
            train_byte_bpe([os.path.join(workdir, "train.jsonl")], model, args.vocab_size)
        else:
            train_sentencepiece([os.path.join(workdir, "train.jsonl")], prefix, args.vocab_size)
            model = prefix + ".model"
        print(
            f"trained a {args.vocab_size}-piece {args.type} BPE on {taken / 1e6:.1f} MB in "
            f"{time.perf_counter() - start:.1f}s"
        )
    modes = [False, True] if args.sentences else [False]
    ratios: dict[str, list[float]] = {}
    for round_ in range(args.rounds):  # raw and pipeline interleaved: load drifts on a shared machine
        if args.rounds > 1:
            print(f"round {round_ + 1} of {args.rounds}")
        raw_tps, raw_cpu_tps = raw_rates(texts, model, size, args.type)
        scaling = machine_scaling()
        ratios.setdefault("machine 2-process scaling", []).append(scaling)
        print(f"machine now: 2 processes burn CPU {scaling:.2f}x as fast as 1 (2.0 on 2 idle cores)")
        for split in modes:
            for key, value in preprocess_rates(args, model, workdir, size, split, raw_tps, raw_cpu_tps).items():
                ratios.setdefault(key, []).append(value)
    if args.rounds > 1:
        print("median over the rounds: " + "; ".join(f"{k} {statistics.median(v):.2f}x" for k, v in ratios.items()))

    if args.type == "bpe":
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        threaded = open_tokenizer(model)
        start = time.perf_counter()
        tokens = sum(len(ids) for k in range(0, len(texts), 256) for ids in threaded.encode_batch(texts[k : k + 256]))
        rate = tokens / (time.perf_counter() - start)
        print(f"for comparison, tokenizers on its own thread pool: {rate:,.0f} tokens/s ({rate / raw_tps:.2f}x)")
    del texts

    if not args.no_memory:
        quarter = os.path.join(workdir, "quarter.jsonl")
        with open(args.corpus, "rb") as src, open(quarter, "wb") as dst:
            budget = os.path.getsize(args.corpus) // 4
            for line in src:
                if budget <= 0:
                    break
                dst.write(line)
                budget -= len(line)
        for name in (quarter, args.corpus):
            parent, worker = peak_memory(name, model, workdir)
            print(
                f"peak RSS, sentences, 2 workers, {os.path.getsize(name) / 1e6:.0f} MB input: "
                f"parent {parent} MiB, worker {worker} MiB"
            )
    print(f"scratch files in {workdir}" if args.workdir else "")
    if not args.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
