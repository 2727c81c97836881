#!/usr/bin/env bash
# Multi-node pretraining with the deepspeed launcher and a hostfile (one line per node: "host slots=8").
#
#   SIZE=glm-10b HOSTFILE=hostfile DATA=data/corpus_text_sentence TOKENIZER=tok.model SAVE=ckpt/glm-10b \
#     bash examples/pretrain_cluster.sh [extra flags, e.g. --train-iters 1000]
#
# SIZE picks examples/configs/$SIZE.yaml (glm-base, glm-large, glm-large-chinese, glm-2b, glm-10b).
# DS_CONFIG defaults to ZeRO-1 with bf16. Set DRY_RUN=1 to validate the config for the cluster's world size.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:?set SIZE, e.g. glm-large}
HOSTFILE=${HOSTFILE:-hostfile}
DATA=${DATA:?set DATA to a preprocessed prefix (or "0.5 A 0.5 B")}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a sentencepiece .model}
SAVE=${SAVE:-checkpoints/$SIZE}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1_bf16.json}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
read -r -a DATA_ARGS <<< "$DATA"
ARGS=(--config "examples/configs/$SIZE.yaml" --data-path "${DATA_ARGS[@]}" --tokenizer-model "$TOKENIZER"
      --deepspeed_config "$DS_CONFIG" --bf16 --save "$SAVE" --load "$SAVE" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  nodes=$(grep -c -v '^\s*\(#\|$\)' "$HOSTFILE")
  WORLD_SIZE=$(( nodes * GPUS_PER_NODE )) python pretrain_glm.py "${ARGS[@]}" --dry-run
  exit 0
fi
exec deepspeed --hostfile "$HOSTFILE" pretrain_glm.py "${ARGS[@]}"
