#!/usr/bin/env bash
# Every benchmark of the "Speed where it matters" table, baselines in the same run; prints the tables.
#
#   bash scripts/bench_gpu.sh            # one GPU (sized for < 5 min on one H100)
#   bash scripts/bench_gpu.sh --quick    # CPU smoke run (seconds; what the test runs)
#
# 1. nearest code, N=65,536, K=16,384, D in {8, 256}: full matrix / chunked / Triton (exact, fast)
# 2. GPT-2 small training step, 1024 tokens x batch 16, vocabulary ~66.7k (scripts/bench_lm.py)
# 3. text-to-image sampling, 256 image tokens, GPT-2 small, 1 and 64 images, CFG:
#    HF generate vs vqgpt plain vs vqgpt fast
# Python is $PYTHON, else .venv/bin/python when it exists, else python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"

if [ "${1:-}" = "--quick" ]; then
  nearest=(--quick)
  lm=(--quick --device cpu --seq-len 48 --peak-tflops 1)
  sampling=(--quick)
elif [ -z "${1:-}" ]; then
  nearest=()
  lm=(--preset small --seq-len 1024 --batch-size 16 --codebook-size 16384)
  sampling=()
else
  echo "usage: bash scripts/bench_gpu.sh [--quick]" >&2
  exit 2
fi

echo "## nearest-code search"
"$PY" scripts/bench_nearest_code.py "${nearest[@]}"
echo
echo "## GPT-2 training step"
"$PY" scripts/bench_lm.py "${lm[@]}"
echo
echo "## text-to-image sampling"
"$PY" scripts/bench_sampling.py "${sampling[@]}"
