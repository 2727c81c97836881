#!/usr/bin/env bash
# pretrain_glm.py end to end on this machine's device (CUDA with NCCL when present, else CPU with gloo), as a
# user runs it: the embedded corpus -> tokenizer -> preprocessing -> 20 bf16 steps of glm-tiny under torchrun
# with a checkpoint, then a resume to step 30. Fails unless the resumed run trained steps 21-30.
#   benchmarks/train_smoke.sh          # from the repository root; PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
TORCHRUN="$(dirname "$PYTHON")/torchrun"
TMP=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$TMP"' EXIT; echo "work dir $TMP"
"$PYTHON" tools/export_pydoc_corpus.py --output "$TMP/pydoc.jsonl" > /dev/null
"$PYTHON" tools/train_tokenizer.py --input "$TMP/pydoc.jsonl" --vocab-size 2000 --model-prefix "$TMP/tok" \
  --threads 2 > /dev/null
"$PYTHON" tools/preprocess_data.py --input "$TMP/pydoc.jsonl" --tokenizer-model "$TMP/tok.model" \
  --output-prefix "$TMP/pydoc" --split-sentences --workers 2 > /dev/null
ARGS=(--model-size glm-tiny --seq-length 128 --micro-batch-size 4 --data-path "$TMP/pydoc_text_sentence"
      --tokenizer-model "$TMP/tok.model" --bf16 --log-interval 5 --eval-interval 10 --save "$TMP/ckpt")
"$TORCHRUN" --nproc_per_node 1 pretrain_glm.py "${ARGS[@]}" --train-iters 20
"$TORCHRUN" --nproc_per_node 1 pretrain_glm.py "${ARGS[@]}" --train-iters 30 --load "$TMP/ckpt"
"$PYTHON" - "$TMP/ckpt/metrics.jsonl" <<'PY'
import json, sys
steps = [r["step"] for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
# Steps 5-20 logged once (by the first run), 25 and 30 by the resumed one: a restart from 0 would log 5 again.
assert steps == [5, 10, 15, 20, 25, 30], f"expected one run to step 20 and its resume to 30, logged {steps}"
print(f"train_smoke: trained to step 20, resumed and trained to step 30 (logged steps {steps})")
PY
