"""Build the chat example's conversations from the embedded corpus (Python's documentation topics).

Each conversation asks which documentation topic sentences come from: a system turn, then one to three rounds
of ``user: <a sentence of the topic>`` / ``assistant: Topic: <topic name>.`` (the later rounds ask "And this
one? <sentence>", about the same topic), the JSON-lines format of ``finetune_glm.py --task chat``::

    {"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}

Every ``--valid-every``-th sentence of each topic goes to the held-out file only (never trained on).

    python examples/build_chat_data.py --output runs/chat_lora/chat
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "finetune"))

from build_tasks import prose_sentences  # noqa: E402

from megatron_glm.data.corpus import pydoc_documents  # noqa: E402

SYSTEM = "Name the Python documentation topic that each sentence comes from."


def conversations(topic: str, sentences: list[str], rng: random.Random) -> list[dict]:
    """The topic's sentences as conversations of one to three rounds."""
    out, i = [], 0
    while i < len(sentences):
        n = rng.randint(1, 3)
        messages = [{"role": "system", "content": SYSTEM}]
        for j, sentence in enumerate(sentences[i : i + n]):
            messages.append({"role": "user", "content": sentence if j == 0 else f"And this one? {sentence}"})
            messages.append({"role": "assistant", "content": f"Topic: {topic}."})
        out.append({"messages": messages})
        i += n
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="prefix: writes PREFIX_train.jsonl and PREFIX_valid.jsonl")
    parser.add_argument("--max-chars", type=int, default=120, help="longest sentence used")
    parser.add_argument("--valid-every", type=int, default=5)
    parser.add_argument("--max-valid", type=int, default=40, help="most held-out conversations")
    parser.add_argument("--max-train", type=int, default=0, help="most training conversations (0: all)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    train, valid = [], []
    for doc_id, text in pydoc_documents():
        sentences = prose_sentences(text, args.max_chars)
        topic = doc_id.replace("-", " ")
        held = sentences[args.valid_every - 1 :: args.valid_every]
        kept = [s for k, s in enumerate(sentences) if (k + 1) % args.valid_every]
        train += conversations(topic, kept, rng)
        valid += conversations(topic, held, rng)
    rng.shuffle(train)
    rng.shuffle(valid)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    for split, rows in (("train", train[: args.max_train or None]), ("valid", valid[: args.max_valid])):
        path = f"{args.output}_{split}.jsonl"
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".tmp", path)
        turns = sum(sum(m["role"] == "assistant" for m in row["messages"]) for row in rows)
        print(f"wrote {path}: {len(rows)} conversations, {turns} assistant turns")


if __name__ == "__main__":
    main()
