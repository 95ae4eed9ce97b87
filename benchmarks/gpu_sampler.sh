#!/usr/bin/env bash
# The sampler benchmark on a GPU: emor3 `sample` vs transformers `generate`, same weights and prompts, B·G = 64 rows,
# 128 new tokens, bf16, tiny and ~100M configs; once eager and once with the decode step under torch.compile
# (--compile adds the compiled row and reports its first-call compile time separately).
# Usage: benchmarks/gpu_sampler.sh [extra bench_sampler.py flags]   (from the repository root, after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" benchmarks/bench_sampler.py --device cuda --dtype bfloat16 --configs tiny,100m --repeats 3 --compile "$@"
