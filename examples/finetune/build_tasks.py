"""Build the worked example's tasks from the embedded corpus (Python's documentation topics, 79 of them).

- ``topic_cloze_{train,valid}.jsonl`` (cloze, 4-way): ``{"text": "<sentence> This is about [MASK].",
  "choices": [4 topic names], "label": k}``: which topic is the sentence from? Distractors: other topics.
- ``topic_name_{train,valid}.jsonl`` (seq2seq): ``{"source": "<sentence> Topic:", "target": "<topic name>"}``.
- ``next_sentence_{train,valid}.jsonl`` (cloze, 4-way) and ``continue_{train,valid}.jsonl`` (seq2seq): which
  sentence comes next / generate the next sentence (harder; held out by whole topics).

Held-out items are never trained on: for the topic tasks every ``--valid-every``-th sentence of each topic is
held out, for the next-sentence tasks every ``--valid-every``-th topic.

    python examples/finetune/build_tasks.py --output runs/finetune/tasks
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_glm.data.corpus import pydoc_documents
from megatron_glm.data.sentence_split import split_sentences

_PROSE = re.compile(r"^[A-Z][^*=\[\]{}<>|]+[.]$")


def prose_runs(text: str, max_chars: int) -> list[list[str | None]]:
    """Per prose paragraph, its sentences (None where a sentence is not plain prose of a sensible length)."""
    runs = []
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.startswith((" ", "\t")) or "***" in paragraph or "===" in paragraph:
            continue  # code blocks and headings
        sentences = [" ".join(s.split()) for s in split_sentences(paragraph)]
        runs.append(
            [s if 25 <= len(s) <= max_chars and len(s.split()) >= 5 and _PROSE.match(s) else None for s in sentences]
        )
    return runs


def prose_pairs(text: str, max_chars: int) -> list[tuple[str, str]]:
    """Consecutive (sentence, next sentence) pairs of the text's prose paragraphs."""
    return [(a, b) for run in prose_runs(text, max_chars) for a, b in itertools.pairwise(run) if a and b]


def prose_sentences(text: str, max_chars: int) -> list[str]:
    return [s for run in prose_runs(text, max_chars) for s in run if s]


def topic_tasks(docs: list[tuple[str, str]], args: argparse.Namespace, rng: random.Random) -> dict[str, list]:
    """Topic cloze and topic-name seq2seq rows per split."""
    names = {doc_id: doc_id.replace("-", " ") for doc_id, _ in docs}
    out: dict[str, list] = {"cloze_train": [], "cloze_valid": [], "name_train": [], "name_valid": []}
    for doc_id, text in docs:
        seen = set()
        for i, sentence in enumerate(prose_sentences(text, args.max_chars)):
            if sentence in seen:
                continue
            seen.add(sentence)
            split = "valid" if i % args.valid_every == args.valid_every - 1 else "train"
            choices = [names[doc_id], *rng.sample([n for d, n in names.items() if d != doc_id], 3)]
            rng.shuffle(choices)
            out[f"cloze_{split}"].append(
                {"text": f"{sentence} This is about [MASK].", "choices": choices, "label": choices.index(names[doc_id])}
            )
            out[f"name_{split}"].append({"source": f"{sentence} Topic:", "target": names[doc_id]})
    return out


def write(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="directory for the four .jsonl files")
    p.add_argument("--valid-every", type=int, default=5, help="every N-th topic is held out (default 5)")
    p.add_argument("--max-chars", type=int, default=120, help="longest sentence kept (default 120 characters)")
    p.add_argument("--max-valid", type=int, default=200, help="most held-out items per task (default 200)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    docs = pydoc_documents()
    by_split: dict[str, list] = {"train": [], "valid": []}
    for i, (_, text) in enumerate(docs):
        held_out = i % args.valid_every == args.valid_every - 1
        by_split["valid" if held_out else "train"].append(prose_pairs(text, args.max_chars))
    os.makedirs(args.output, exist_ok=True)
    topics = topic_tasks(docs, args, rng)
    for split in ("train", "valid"):
        order = list(range(len(topics[f"cloze_{split}"])))
        rng.shuffle(order)
        order = order[: args.max_valid] if split == "valid" else order
        write(os.path.join(args.output, f"topic_cloze_{split}.jsonl"), [topics[f"cloze_{split}"][i] for i in order])
        write(os.path.join(args.output, f"topic_name_{split}.jsonl"), [topics[f"name_{split}"][i] for i in order])
        print(f"topic tasks, {split}: {len(order)} items per task")
    for name, doc_pairs in by_split.items():
        cloze, seq2seq = [], []
        for d, pairs in enumerate(doc_pairs):
            others = [b for e, ps in enumerate(doc_pairs) if e != d for _, b in ps]
            for a, b in pairs:
                choices = [b, *rng.sample(others, 3)]
                rng.shuffle(choices)
                cloze.append({"text": f"{a} [MASK]", "choices": choices, "label": choices.index(b)})
                seq2seq.append({"source": a, "target": b})
        order = list(range(len(cloze)))
        rng.shuffle(order)
        if name == "valid":
            order = order[: args.max_valid]
        write(os.path.join(args.output, f"next_sentence_{name}.jsonl"), [cloze[i] for i in order])
        write(os.path.join(args.output, f"continue_{name}.jsonl"), [seq2seq[i] for i in order])
        print(f"next-sentence tasks, {name}: {len(order)} items per task from {len(doc_pairs)} topics")


if __name__ == "__main__":
    main()
