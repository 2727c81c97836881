#!/usr/bin/env bash
# pretrain_glm.py end to end on this machine's device (CUDA with NCCL when present, else CPU with gloo), as a
# user runs it: the embedded corpus -> tokenizer -> preprocessing -> a 30-step bf16 glm-tiny run under torchrun
# with --deterministic, stopped with a checkpoint at step 20 (--exit-interval), resumed to step 30, and the
# same run straight to 30. Fails unless the resumed run trained steps 21-30 with the straight run's losses,
# bitwise (what --deterministic is for).
# Two ranks (data parallel, so collectives cross NCCL) with 2 or more GPUs or on a CPU; one rank on one GPU
# (NCCL cannot run two ranks on one device), said so.
#   benchmarks/train_smoke.sh          # from the repository root; PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
TORCHRUN="$(dirname "$PYTHON")/torchrun"
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
case "$GPUS" in
  0) NPROC=2; echo "train_smoke: CPU, 2 ranks on gloo" ;;
  1) NPROC=1; echo "train_smoke: 1 GPU: 1 rank (NCCL cannot run two ranks on one GPU; no collective crosses it)" ;;
  *) NPROC=2; echo "train_smoke: $GPUS GPUs: 2 ranks on NCCL (data parallel)" ;;
esac
TMP=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$TMP"' EXIT; echo "work dir $TMP"
"$PYTHON" tools/export_pydoc_corpus.py --output "$TMP/pydoc.jsonl" > /dev/null
"$PYTHON" tools/train_tokenizer.py --input "$TMP/pydoc.jsonl" --vocab-size 2000 --model-prefix "$TMP/tok" \
  --threads 2 > /dev/null
"$PYTHON" tools/preprocess_data.py --input "$TMP/pydoc.jsonl" --tokenizer-model "$TMP/tok.model" \
  --output-prefix "$TMP/pydoc" --split-sentences --workers 2 > /dev/null
ARGS=(--model-size glm-tiny --seq-length 128 --micro-batch-size 4 --data-path "$TMP/pydoc_text_sentence"
      --tokenizer-model "$TMP/tok.model" --bf16 --deterministic --log-interval 5 --eval-interval 10
      --train-iters 30)
run() { "$TORCHRUN" --standalone --nproc_per_node "$NPROC" pretrain_glm.py "${ARGS[@]}" "$@"; }
run --save "$TMP/ckpt" --exit-interval 20
run --save "$TMP/ckpt" --load "$TMP/ckpt"
run --save "$TMP/straight"
"$PYTHON" - "$TMP/ckpt/metrics.jsonl" "$TMP/straight/metrics.jsonl" <<'PY'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}
resumed, straight = losses(sys.argv[1]), losses(sys.argv[2])
# Steps 5-20 logged once (by the first run), 25 and 30 by the resumed one: a restart from 0 would log 5 again.
assert sorted(resumed) == [5, 10, 15, 20, 25, 30], f"expected one run to step 20 and its resume to 30: {resumed}"
assert resumed == straight, f"the resumed run differs from the straight one: {resumed} vs {straight}"
print(f"train_smoke: trained to step 20, resumed to step 30, equal to the straight run bitwise ({resumed})")
PY
