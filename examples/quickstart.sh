#!/usr/bin/env bash
# Quick start on a fresh machine (CPU is enough): install, build the embedded corpus, train a tokenizer,
# preprocess, then pretrain glm-tiny on 2 processes with tensor parallelism 2 under the deepspeed launcher.
#
#   bash examples/quickstart.sh                 # everything, ~3-5 minutes on 2 cores (first install excluded)
#   STEPS=50 bash examples/quickstart.sh        # shorter
#   NPROC=1 TP=1 bash examples/quickstart.sh    # one process
#   DRY_RUN=1 bash examples/quickstart.sh       # validate the config only
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
STEPS=${STEPS:-300}
NPROC=${NPROC:-2}
TP=${TP:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

bash scripts/setup_env.sh
PY=.venv/bin/python
mkdir -p "$OUT"
start=$(date +%s)
[ -f "$OUT/pydoc.jsonl" ] || $PY tools/export_pydoc_corpus.py --output "$OUT/pydoc.jsonl"
[ -f "$OUT/tokenizer.model" ] || $PY tools/train_tokenizer.py --input "$OUT/pydoc.jsonl" --vocab-size 4000 \
  --model-prefix "$OUT/tokenizer"
[ -f "$OUT/pydoc_text_sentence.idx" ] || $PY tools/preprocess_data.py --input "$OUT/pydoc.jsonl" \
  --tokenizer-model "$OUT/tokenizer.model" --output-prefix "$OUT/pydoc" --split-sentences --workers 2

ARGS=(--config examples/configs/glm-tiny.yaml --data-path "$OUT/pydoc_text_sentence"
      --tokenizer-model "$OUT/tokenizer.model" --tensor-model-parallel-size "$TP" --train-iters "$STEPS"
      --save "$OUT/checkpoints")
if [ -n "${DRY_RUN:-}" ]; then
  WORLD_SIZE=$NPROC $PY pretrain_glm.py "${ARGS[@]}" --dry-run
  exit 0
fi
.venv/bin/deepspeed --num_gpus "$NPROC" pretrain_glm.py "${ARGS[@]}" "$@" 2>&1 \
  | grep --line-buffered -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^W[0-9]+ |^\s*$"
echo "quick start finished in $(( $(date +%s) - start )) s; checkpoints and metrics.jsonl in $OUT/checkpoints"
