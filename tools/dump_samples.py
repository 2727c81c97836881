"""Show what GLM is trained on: write pretraining samples as JSON lines, or decoded with --pretty.

Usage:
    python tools/dump_samples.py --data-path PREFIX --tokenizer-model M --seq-length L --num N \\
        [--pretty] [--start I] [--split-name train|valid|test] [sampler flags]

Sampler flags are the pretraining ones (``--bert-prob``, ``--gap-sentence-prob``, ``--gpt-min-ratio``,
``--no-shuffle-block``, ``--seed``, ``--micro-batch-size``, ``--split``, ... or ``--data.objective.X``),
so a dump shows exactly the samples a training run with the same flags sees at those indices.
Without ``--split`` every document is in the train split. Nothing is written next to the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from megatron_glm.config import load_config, problems
from megatron_glm.data.blank_infilling import OBJECTIVE_NAMES
from megatron_glm.data.loader import SPLITS, build_pretraining_datasets
from megatron_glm.data.objective_choice import CAUSAL
from megatron_glm.data.tokenizer import TokenizerBase, open_tokenizer
from megatron_glm.errors import ConfigError, DataError, run_cli


def sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of one sample."""
    record = {
        "index": sample["index"],
        "objective": OBJECTIVE_NAMES[sample["objective"]],
        "input_ids": sample["input_ids"].tolist(),
        "labels": sample["labels"].tolist(),
        "loss_mask": sample["loss_mask"].astype(int).tolist(),
        "position_ids": sample["position_ids"][0].tolist(),
        "block_position_ids": sample["position_ids"][1].tolist(),
        "sep": int(sample["sep"]),
    }
    if "doc_ids" in sample:  # --reset-attention-mask: each token's document in the packed window
        record["doc_ids"] = sample["doc_ids"].tolist()
    return record


def pretty(sample: dict[str, Any], tokenizer: TokenizerBase) -> str:
    """Part A with its blanks numbered in Part B order, then each Part B span decoded (a causal sample: its
    text, ``[gMASK]<sop>`` before each document)."""
    inp, lab, pos = sample["input_ids"], sample["labels"], sample["position_ids"]
    if int(sample["objective"]) == CAUSAL:
        text = [int(t) for t in inp if t != tokenizer.pad_id]
        return (
            f"=== sample {sample['index']}: causal objective, {len(text)} tokens, "
            f"{int(sample['loss_mask'].sum())} targets, padding {len(inp) - len(text)} ===\n{tokenizer.decode(text)}"
        )
    sep = int(sample["sep"])
    end_b = sep + int(sample["loss_mask"].sum())
    heads = [sep + i for i in range(end_b - sep) if pos[1, sep + i] == 1]
    number = {int(pos[0, h]): k + 1 for k, h in enumerate(heads)}
    pieces, run = [], []
    for p in range(sep):
        if p in number:
            pieces.append(tokenizer.decode(run))
            run = []
            pieces.append(f"{tokenizer.decode([inp[p]])}#{number[p]}")
        else:
            run.append(int(inp[p]))
    pieces.append(tokenizer.decode(run))
    lines = [
        f"=== sample {sample['index']}: {OBJECTIVE_NAMES[sample['objective']]} objective, "
        f"Part A {sep} tokens, Part B {end_b - sep} tokens, padding {len(inp) - end_b}"
        + (f", documents {int(sample['doc_ids'].max()) + 1}" if "doc_ids" in sample else "")
        + " ===",
        "Part A: " + "".join(pieces),
        "Part B:",
    ]
    for k, h in enumerate(heads):
        stop = heads[k + 1] if k + 1 < len(heads) else end_b
        targets = tokenizer.decode(lab[h : stop - 1])
        lines.append(f"  #{k + 1} (position {int(pos[0, h])}, {stop - h - 1} tokens): {targets}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write GLM pretraining samples as JSON lines (or decoded with --pretty).",
        epilog="Any pretraining data/objective flag is accepted too: --bert-prob, --gap-sentence-prob, "
        "--gpt-infill-prob, --gpt-min-ratio, --avg-block-length, --no-shuffle-block, --seed, ...",
    )
    parser.add_argument("--num", type=int, default=10, help="samples to write (default 10)")
    parser.add_argument("--start", type=int, default=0, help="global index of the first sample (default 0)")
    parser.add_argument("--split-name", choices=SPLITS, default="train", help="which split (default train)")
    parser.add_argument("--pretty", action="store_true", help="print decoded Part A / Part B instead of JSON")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(["--split", "100,0,0", *rest])
    found = [p for p in problems(cfg) if p.startswith("data.")]
    if found:
        raise ConfigError("; ".join(found))
    if not cfg.data.tokenizer_model:
        raise DataError("--tokenizer-model is required")
    if not cfg.data.data_path:
        raise DataError("--data-path is required")
    if args.num < 0 or args.start < 0:
        raise ConfigError("--num and --start must be >= 0")
    tokenizer = open_tokenizer(cfg.data.tokenizer_model)
    datasets = build_pretraining_datasets(cfg, tokenizer, is_rank0=False)
    dataset = datasets[SPLITS.index(args.split_name)]
    if dataset is None:
        raise DataError(f"split {cfg.data.split!r} leaves no {args.split_name} documents")
    try:
        for index in range(args.start, args.start + args.num):
            sample = dataset[index]
            if args.pretty:
                print(pretty(sample, tokenizer), flush=False)
            else:
                print(json.dumps(sample_record(sample)))
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
