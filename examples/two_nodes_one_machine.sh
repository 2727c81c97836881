#!/usr/bin/env bash
# A two-node job on one machine: two torchrun agents ("nodes"), 2 processes each, TP=2 x DP=2, meeting at a
# c10d rendezvous on 127.0.0.1. It behaves as a real two-node job does: if one node dies, the other stops
# with a one-line error within seconds (no hang, no endless restarts: --max-restarts 0), and the same
# command on both nodes resumes from the newest complete checkpoint (--load = --save).
#
#   DATA=runs/quickstart/pydoc_text_sentence TOKENIZER=runs/quickstart/tokenizer.model SAVE=runs/two_nodes \
#     bash examples/two_nodes_one_machine.sh --train-iters 100        # both nodes, in the background
#   NODE_RANK=1 ... bash examples/two_nodes_one_machine.sh ...          # one node only (one shell per node)
#
# On a real cluster run on every node (HEAD: node 0's address, JOB_ID: the same on all nodes):
#   torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --rdzv-backend c10d \
#     --rdzv-endpoint $HEAD:29500 --rdzv-id $JOB_ID --max-restarts 0 pretrain_glm.py ... --save S --load S
# (there the store is hosted by the node whose hostname matches HEAD; no --rdzv-conf needed)
# S must be a directory every node sees (shared file system). Re-run the same command on every node after
# a failure; the scheduler's requeue does this for you (see examples/pretrain_slurm.sbatch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-$(dirname "$PY")/torchrun}
PORT=${PORT:-29533}
JOB=${JOB:-glm-two-nodes}
CONFIG=${CONFIG-examples/configs/glm-tiny.yaml}
SAVE=${SAVE:?set SAVE to the checkpoint directory (shared by both nodes)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARGS=(${CONFIG:+--config "$CONFIG"} --data-path "${DATA:?set DATA to a preprocessed prefix}"
      --tokenizer-model "${TOKENIZER:?set TOKENIZER to a sentencepiece .model}"
      --tensor-model-parallel-size 2 --save "$SAVE" --load "$SAVE" "$@")

# Node 0 hosts the rendezvous store (is_host): on one machine either agent could, and a store that lives on
# the node that dies takes the survivors' agents down with a traceback instead of our one-line error.
# The c10d rendezvous numbers the agents in the order they join, so global rank 0 (the one that logs
# progress) may be on either node.
node() {
  "$TORCHRUN" --nnodes 2 --nproc-per-node 2 --node-rank "$1" --rdzv-backend c10d \
    --rdzv-endpoint "127.0.0.1:$PORT" --rdzv-id "$JOB" --rdzv-conf "is_host=$([ "$1" = 0 ] && echo 1 || echo 0)" \
    --max-restarts 0 pretrain_glm.py "${ARGS[@]}"
}

if [ -n "${NODE_RANK:-}" ]; then
  node "$NODE_RANK"
  exit
fi
node 0 & first=$!
node 1 & second=$!
status=0
wait "$first" || status=$?
wait "$second" || status=$?
exit "$status"
