"""Build the worked example's two tasks from the embedded corpus (Python's documentation topics).

- ``next_sentence_{train,valid}.jsonl`` (cloze, 4-way): ``{"text": "<sentence> [MASK]", "choices": [4
  sentences], "label": k}``: which sentence comes next? The distractors are sentences of other topics.
- ``continue_{train,valid}.jsonl`` (seq2seq): ``{"source": "<sentence>", "target": "<next sentence>"}``.

Held-out items come from held-out documents (every ``--valid-every``-th topic), never trained on.

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


def prose_pairs(text: str, max_chars: int) -> list[tuple[str, str]]:
    """Consecutive (sentence, next sentence) pairs of the text's prose paragraphs."""
    pairs = []
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.startswith((" ", "\t")) or "***" in paragraph or "===" in paragraph:
            continue  # code blocks and headings
        sentences = [" ".join(s.split()) for s in split_sentences(paragraph)]
        ok = [s if 25 <= len(s) <= max_chars and len(s.split()) >= 5 and _PROSE.match(s) else None for s in sentences]
        pairs += [(a, b) for a, b in itertools.pairwise(ok) if a and b]
    return pairs


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
    split = {"train": [], "valid": []}
    for i, (_, text) in enumerate(docs):
        held_out = i % args.valid_every == args.valid_every - 1
        split["valid" if held_out else "train"].append(prose_pairs(text, args.max_chars))
    os.makedirs(args.output, exist_ok=True)
    for name, doc_pairs in split.items():
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
            order = order[:args.max_valid]
        write(os.path.join(args.output, f"next_sentence_{name}.jsonl"), [cloze[i] for i in order])
        write(os.path.join(args.output, f"continue_{name}.jsonl"), [seq2seq[i] for i in order])
        print(f"{name}: {len(order)} items per task from {len(doc_pairs)} topics")


if __name__ == "__main__":
    main()
