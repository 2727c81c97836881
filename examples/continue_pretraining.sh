#!/usr/bin/env bash
# Continue pretraining a released GLM on your own corpus, and hand the result back to transformers unchanged.
#
# The "release" is a tiny GLM-4-shaped model written by transformers' own classes (GlmForCausalLM, random
# weights; GLM-4-9B's architecture: grouped-query attention with 2 groups, SwiGLU, RMSNorm, QKV bias, rotary on
# half of each head, untied head) with a byte-level BPE tokenizer.json trained on the embedded corpus. With a
# real release (e.g. a GLM-4-9B "-hf" folder) skip steps 2-3 and point RELEASE at it.
#
#   bash examples/continue_pretraining.sh               # ~70 s of CPU time: a few minutes on 2 CPU cores
#   STEPS=100 bash examples/continue_pretraining.sh     # longer runs (the TP=2 run stops at STEPS/2 and resumes)
#   CHECK_RESUME=1 bash examples/continue_pretraining.sh   # also the TP=2 run without the stop, to compare
#
# Steps: corpus -> tokenizer -> release -> import into our layout (TP=2) -> preprocess the corpus with the
# release's tokenizer -> continue pretraining (causal objective) at TP=2, stopped halfway and resumed, and at
# PP=2 -> export to the native transformers layout -> transformers loads it WITHOUT remote code and generates.
# Each step whose output exists is skipped, so a rerun goes on where a failed one stopped. Measured (2-core CPU
# shared with other jobs, defaults): loss 7.55 -> 6.50 at TP=2 and PP=2 alike; 426 s wall, 68 s of CPU time.
# A tiny model after 40 steps continues a prompt with the corpus's commonest tokens; the point is the round trip.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/continue_pretraining}
STEPS=${STEPS:-40}
LOG_INTERVAL=${LOG_INTERVAL:-5}
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-$(dirname "$PY")/torchrun}
RELEASE=${RELEASE:-$OUT/tiny-glm-4-hf}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
start=$(date +%s)
say() { printf '\n== [%3ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
quiet() { grep --line-buffered -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^W[0-9]+ |^\s*$|shm_comm_op" || true; }

say "1. corpus: Python's bundled documentation as JSONL (79 documents, no download)"
[ -f "$OUT/pydoc.jsonl" ] || $PY tools/export_pydoc_corpus.py --output "$OUT/pydoc.jsonl"

if [ ! -f "$RELEASE/config.json" ]; then
  say "2. tokenizer: a byte-level BPE tokenizer.json with GLM-4's special tokens ([gMASK], <sop>, <|endoftext|>, ...)"
  $PY tools/train_tokenizer.py --type bpe --input "$OUT/pydoc.jsonl" --vocab-size 2000 --model-prefix "$OUT/bpe"
  say "3. release: transformers' GlmForCausalLM (random weights) + the tokenizer, saved by save_pretrained"
  $PY examples/make_tiny_glm4_release.py --tokenizer "$OUT/bpe.json" --output "$RELEASE"
fi

say "4. import: the release (native transformers layout) -> our training checkpoint at TP=2"
[ -f "$OUT/imported/latest" ] || $PY tools/convert_checkpoint.py --input "$RELEASE" --output "$OUT/imported" \
  --format native --target-tp 2 2>&1 | quiet

say "5. preprocess: the corpus with the release's own tokenizer.json (one sequence per document, end of text after each)"
[ -f "$OUT/pydoc_text_document.idx" ] || $PY tools/preprocess_data.py --input "$OUT/pydoc.jsonl" \
  --tokenizer-model "$RELEASE" --output-prefix "$OUT/pydoc" --append-eod --workers 2

# The architecture comes from the imported checkpoint (sealed in it); only the run's options are given here.
# The causal objective in GLM-4's input format: [gMASK]<sop> then the text, loss on every text token.
TRAIN=(--data-path "$OUT/pydoc_text_document" --tokenizer-model "$RELEASE" --data.objective.causal_prob 1 --bert-prob 0
       --seq-length 128 --micro-batch-size 4 --global-batch-size 8 --train-iters "$STEPS" --lr 2e-3 --min-lr 1e-4
       --lr-warmup-iters 4 --lr-decay-style cosine --lr-decay-iters "$STEPS" --log-interval "$LOG_INTERVAL" --eval-interval 0
       --seed 1234 --load "$OUT/imported" --checkpoint.load_weights_only true)
train() {  # train SAVE_DIR [flags...]: 2 processes on this machine (CPU + gloo, or one GPU each)
  local save=$1
  shift
  "$TORCHRUN" --standalone --nproc_per_node 2 pretrain_glm.py "${TRAIN[@]}" --save "$save" "$@" 2>&1 | quiet
}
done_at() { [ "$(cat "$1/latest" 2>/dev/null)" = "global_step$STEPS" ]; }

say "6. continue pretraining at TP=2: $STEPS steps from the imported weights, stopped at step $((STEPS / 2)) as a preempted job would be, then resumed"
if ! done_at "$OUT/tp2"; then
  [ -f "$OUT/tp2/latest" ] || train "$OUT/tp2" --tensor-model-parallel-size 2 --exit-interval $((STEPS / 2))
  train "$OUT/tp2" --tensor-model-parallel-size 2 --load "$OUT/tp2" --checkpoint.load_weights_only false
fi
if [ -n "${CHECK_RESUME:-}" ] && ! done_at "$OUT/tp2-straight"; then
  say "6b. the same TP=2 run without the stop (its losses and weights must equal the resumed run's bitwise)"
  train "$OUT/tp2-straight" --tensor-model-parallel-size 2
fi

say "7. continue pretraining at PP=2 (2 pipeline stages, one layer each), from the same imported weights"
done_at "$OUT/pp2" || train "$OUT/pp2" --pipeline-model-parallel-size 2

say "8. export: the TP=2 run -> the native transformers layout (GlmForCausalLM's names and config, tokenizer files)"
[ -f "$OUT/export-hf/config.json" ] || $PY tools/convert_checkpoint.py --input "$OUT/tp2" --output "$OUT/export-hf" \
  --format hf 2>&1 | quiet

say "9. transformers: AutoModelForCausalLM / AutoTokenizer from the exported folder, offline, no remote code; greedy generation"
$PY examples/generate_with_transformers.py --model "$OUT/export-hf" --prompt "The for statement" \
  --prompt "Lambda expressions" --max-new-tokens 24 --report "$OUT/transformers_generate.json"

say "done in $(( $(date +%s) - start )) s; losses in $OUT/{tp2,pp2}/metrics.jsonl, the exported model in $OUT/export-hf"
