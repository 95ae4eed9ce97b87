#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py) on one 80-140 GB GPU, in about 8 minutes: full-depth
# Qwen2.5-VL-3B (random weights) parity with transformers in bf16 against the float32 floor, the sampler's CUDA-graph
# decode step against eager sampling and generate at 8 x 8 rows x 512 tokens with a 448-px image, three GRPO steps of
# the EmoSet recipe (fp32 master weights, bf16 compute, gradient checkpointing, the RER judge) eager and with the
# graph. Writes $OUT/gpu_check.json and $OUT/gpu_check.md (default runs/gpu_check). Extra flags go to gpu_check.py
# (e.g. --parts sampler:compiled for the torch.compile variant).
# Usage: benchmarks/gpu_check.sh   (from the repository root, after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3  # a GPU machine whose image holds torch, without this checkout's .venv
OUT=${OUT:-runs/gpu_check}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout "${TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
cat "$OUT/gpu_check.md"
