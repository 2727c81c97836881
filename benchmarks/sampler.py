"""Samples per second per core of the blank-infilling sampler at seq 512.

Usage: python benchmarks/sampler.py [--seq-length 512] [--seconds 2] [--cpu N] [--byte-fallback SHARE]

Builds a synthetic corpus (random ids, ~25-token sentences, ~400-token documents) in a temporary
directory, then measures on one process:

- ``objective``: the objective alone on windows already read (token / sentence / document);
- ``dataset``: ``GLMDataset[i]`` end to end (read the window from the memory-mapped ``.bin``,
  key the generator, build the sample) per objective and for two mixtures: the default
  (``--bert-prob 0.5``, rest document) and GLM-10B's (``--gap-sentence-prob 0.3``);
Rates are samples per CPU second of this process (the per-core figure, robust to other load on the
machine) and per wall second.

``--byte-fallback SHARE`` gives the sampler character boundaries (:mod:`megatron_glm.data.char_boundaries`)
with that share of the ids being byte pieces inside a character (about 0.05 for classical Chinese with a
1,200-piece byte-fallback model), so the cost of keeping spans on whole characters is measured.

- ``reference``: a straightforward pure-Python token objective (lists, ``random.Random``, one loop
  per token, as the original implementation is written), in the same run, for the ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from megatron_glm.config import ObjectiveConfig
from megatron_glm.data.blank_infilling import (
    DOCUMENT,
    OBJECTIVE_NAMES,
    SENTENCE,
    TOKEN,
    BlankInfilling,
    ObjectiveChoice,
    SpecialTokens,
)
from megatron_glm.data.char_boundaries import CharBoundaries
from megatron_glm.data.indexed_dataset import IndexedDatasetBuilder
from megatron_glm.data.loader import GLMDataset
from megatron_glm.data.objectives import Objectives
from megatron_glm.data.samples import DocumentWindows, KeyedRNG

VOCAB = 30000
SP = SpecialTokens(
    pad=VOCAB,
    eos=VOCAB + 1,
    cls=VOCAB + 2,
    mask=VOCAB + 3,
    smask=VOCAB + 4,
    gmask=VOCAB + 5,
    sop=VOCAB + 6,
    eop=VOCAB + 7,
    dblock=VOCAB + 8,
)


def make_corpus(prefix: str, documents: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(documents):
            sentences = max(1, int(rng.lognormal(math.log(16), 0.6)))
            lengths = np.maximum(1, rng.poisson(25, sentences))
            tokens = rng.integers(0, VOCAB, int(lengths.sum()))
            tokens[-1] = SP.eos
            builder.add_document(tokens, lengths)


def reference_token_sample(tokens: list[int], rng: random.Random, seq_length: int) -> dict[str, list[int]]:
    """A plain pure-Python token objective: Poisson spans, Part A / Part B built token by token."""
    weights = [3.0**k * math.exp(-3.0) / math.factorial(k) for k in range(1, 40)]
    lengths: list[int] = []
    while True:
        n = min(len(tokens), seq_length - 2 * len(lengths))
        if sum(lengths) >= max(1, int(0.15 * n)):
            break
        lengths.append(rng.choices(range(1, 40), weights=weights)[0])
    n = min(len(tokens), seq_length - 2 * len(lengths))
    text = tokens[:n]
    rng.shuffle(lengths)
    free = n - 1 - sum(lengths)
    places = sorted(rng.randrange(free - len(lengths) + 2) for _ in lengths)
    spans, offset = [], 1
    for place, length in zip(places, lengths):
        spans.append((offset + place, offset + place + length))
        offset += length + 1
    source, source_pos, masks = [], [], []
    last = 0
    for start, end in spans:
        for i in range(last, start):
            source.append(text[i])
            source_pos.append(len(source_pos))
        masks.append(len(source))
        source.append(SP.mask)
        source_pos.append(len(source_pos))
        last = end
    for i in range(last, n):
        source.append(text[i])
        source_pos.append(len(source_pos))
    order = list(range(len(spans)))
    rng.shuffle(order)
    target_in, target_out, target_pos, block_pos = [], [], [], []
    for k in order:
        start, end = spans[k]
        target_in.append(SP.sop)
        for i in range(start, end):
            target_in.append(text[i])
            target_out.append(text[i])
        target_out.append(SP.eop)
        for j in range(end - start + 1):
            target_pos.append(masks[k])
            block_pos.append(j + 1)
    pad = seq_length - len(source) - len(target_in)
    return {
        "input_ids": source + target_in + [SP.pad] * pad,
        "labels": source + target_out + [SP.pad] * pad,
        "loss_mask": [0] * len(source) + [1] * len(target_in) + [0] * pad,
        "position_ids": source_pos + target_pos + [0] * pad,
        "block_position_ids": [0] * len(source) + block_pos + [0] * pad,
    }


def rate(fn: Callable[[int], object], seconds: float) -> tuple[float, float]:
    """Calls of ``fn(i)`` (i = 0, 1, ...) per CPU second of this process and per wall second.

    Per CPU second is the per-core figure even on a busy machine (best of three rounds each).
    """
    best_cpu = best_wall = 0.0
    start_index = 0
    for _ in range(3):
        count, wall, cpu = 0, time.perf_counter(), time.process_time()
        while True:
            for _ in range(50):
                fn(start_index + count)
                count += 1
            elapsed = time.perf_counter() - wall
            if elapsed >= seconds / 3:
                break
        used = time.process_time() - cpu
        start_index += count
        best_cpu = max(best_cpu, count / max(used, 1e-9))
        best_wall = max(best_wall, count / elapsed)
    return best_cpu, best_wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (Linux)")
    parser.add_argument("--byte-fallback", type=float, default=0.0, help="share of ids inside a character")
    args = parser.parse_args()
    chars = None
    if args.byte_fallback > 0:  # ids below the share are continuation bytes, the next 64 lead bytes
        cut = int(args.byte_fallback * VOCAB)
        lead = np.zeros(VOCAB, dtype=np.int8)
        lead[cut : cut + 64] = 2
        chars = CharBoundaries(np.arange(VOCAB) < cut, lead)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    L = args.seq_length
    print(
        f"seq_length {L}, numpy {np.__version__}, python {sys.version.split()[0]}, one process, "
        f"byte-fallback share {args.byte_fallback}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "bench")
        make_corpus(prefix, args.documents)
        windows = DocumentWindows(prefix, (0, args.documents), L, cls_id=SP.cls, eos_id=SP.eos, seed=1, cache_dir=tmp)
        rows: list[tuple[str, tuple[float, float]]] = []
        pool = [windows.window(i, sentences=True) for i in range(500)]
        keyed = KeyedRNG()

        bi = BlankInfilling(ObjectiveConfig(gap_sentence_prob=0.3, bert_prob=0.5), SP, L, chars)
        for objective in (TOKEN, SENTENCE, DOCUMENT):
            choice = ObjectiveChoice(objective)

            def objective_only(i: int, choice=choice) -> object:
                w = pool[i % len(pool)]
                return bi.sample(w.tokens, keyed(1, 0, i), choice, w.sentence_starts)

            rows.append((f"objective {OBJECTIVE_NAMES[objective]}", rate(objective_only, args.seconds)))

        for objective in (TOKEN, SENTENCE, DOCUMENT):
            cfg = ObjectiveConfig(bert_prob=float(objective == TOKEN), gap_sentence_prob=float(objective == SENTENCE))
            ds = GLMDataset(windows, Objectives(cfg, SP, L, chars), seed=1, group_size=8)
            rows.append((f"dataset   {OBJECTIVE_NAMES[objective]}", rate(ds.__getitem__, args.seconds)))
        for name, cfg in (
            ("mixture (default: 0.5 token, 0.5 document)", ObjectiveConfig()),
            (
                "mixture (10B: 0.5 token, 0.3 sentence, 0.2 document)",
                ObjectiveConfig(gap_sentence_prob=0.3, gpt_min_ratio=0.25),
            ),
            ("causal (GLM-4's [gMASK]<sop> format)", ObjectiveConfig(bert_prob=0.0, causal_prob=1.0)),
        ):
            ds = GLMDataset(windows, Objectives(cfg, SP, L, chars), seed=1, group_size=8)
            rows.append((f"dataset   {name}", rate(ds.__getitem__, args.seconds)))

        token_lists = [w.tokens.tolist() for w in pool[:100]]
        ref_rng = random.Random(0)
        reference = rate(lambda i: reference_token_sample(token_lists[i % 100], ref_rng, L), args.seconds)
        rows.append(("reference pure-Python token objective", reference))
        width = max(len(name) for name, _ in rows)
        print(f"{'':<{width}}  {'per CPU second':>14}  {'vs reference':>12}  {'per wall second':>15}")
        for name, (cpu, wall) in rows:
            print(f"{name:<{width}}  {cpu:>14,.0f}  {cpu / reference[0]:>11.1f}x  {wall:>15,.0f}")


if __name__ == "__main__":
    main()
