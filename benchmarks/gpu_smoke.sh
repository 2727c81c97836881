#!/usr/bin/env bash
# One command for a machine with one CUDA GPU (under 5 minutes): the CUDA-marked tests (flex vs SDPA forward
# and backward, a bf16 training step, bf16 KV-cache generation, torch.compile), then tokens/s and MFU of a
# glm-2b-shaped step at seq 2048 for each attention kernel, then pretrain_glm.py end to end on the GPU (NCCL,
# bf16: 20 steps, a checkpoint, a resume to step 30; benchmarks/train_smoke.sh).
#   benchmarks/gpu_smoke.sh            # from the repository root; PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_smoke.sh: no CUDA device")'
timeout 150 "$PYTHON" -m pytest -q -m cuda tests/cuda
timeout 150 "$PYTHON" benchmarks/gpu_step.py "$@"
timeout 240 bash benchmarks/train_smoke.sh
