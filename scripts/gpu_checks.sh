#!/usr/bin/env bash
# The checks that need a real GPU, in one prepared run (a lent GPU machine bills its minutes):
#
#   bash scripts/gpu_checks.sh [OUT_DIR]     # default OUT_DIR: runs/gpu_checks
#
# 1. the CUDA tests: the Triton nearest-code kernel against the chunked search on real hardware,
#    a kernel that really fails (tiles too big for shared memory) falling back with one warning,
#    the quantizer's codes on CUDA = on the CPU (tests/tokenizer/test_kernels.py -k cuda)
# 2. `vqgpt demo --quick` on the GPU: every stage end to end (bf16 autocast, CUDA-graph sampling)
# 3. tests/test_gpu_recipes.py: the GPU recipes (tokenizer, LM), shrunk, a few steps on CUDA
# 4. scripts/bench_gpu.sh: the "Speed where it matters" tables of docs/benchmarks.md
# 5. scripts/bench_kernel_tiles.py: the nearest-code kernel's tiles against the chunked search
# Each step has its own time limit and the script goes on after a failing step; logs land in
# OUT_DIR. Python is $PYTHON, else python3. Wheels in .whl/ (packages the machine lacks; see
# /work/.library/device/README.md in the project's workplace) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-runs/gpu_checks}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHON="$PY"  # scripts/bench_gpu.sh reads it
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT_DIR/$name.log"
  echo "=== $name: rc $rc in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

step cuda_tests 150 "$PY" -m pytest tests/tokenizer/test_kernels.py -k cuda -p no:cacheprovider \
  -o addopts="--import-mode=importlib" -q -rs
step demo_quick 150 "$PY" -m vqgpt.cli demo --quick --out "$OUT_DIR/demo"
cp "$OUT_DIR/demo/report/report.md" "$OUT_DIR/demo_report.md" 2>/dev/null || true
step gpu_recipes 120 "$PY" -m pytest tests/test_gpu_recipes.py -p no:cacheprovider \
  -o addopts="--import-mode=importlib" -q -rs
step bench_gpu 330 bash scripts/bench_gpu.sh
step kernel_tiles 90 "$PY" scripts/bench_kernel_tiles.py
exit $status
