"""Export Python's bundled documentation topics (``pydoc_data.topics``) as a JSONL corpus.

The default corpus of the quick start: 79 documents (~0.5 MB of English prose) that ship with every
CPython, so nothing needs downloading. Each line is ``{"id": topic, "text": text}``::

    python tools/export_pydoc_corpus.py --output data/pydoc.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.data.corpus import pydoc_documents, write_jsonl
from megatron_glm.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--key", default="text", help="JSON key for the text (default: text)")
    args = parser.parse_args(argv)
    documents = pydoc_documents()
    write_jsonl(args.output, [{"id": topic, args.key: text} for topic, text in documents])
    size = sum(len(text.encode("utf-8")) for _, text in documents)
    print(f"wrote {len(documents)} documents ({size / 1e6:.2f} MB of text) to {args.output}")


if __name__ == "__main__":
    run_cli(main)
