#!/usr/bin/env bash
# Launch the tiny 2-process tokenizer run N times under load (two busy loops on the cores) and
# count the runs that hang (no exit within 90 s) or fail: the check behind the multi-process
# exit fix (docs/results.md, "Several processes").   Usage: bash scripts/stress_launch.sh [N]
set -u
N=${1:-12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
PY=${PYTHON:-$ROOT/.venv/bin/python}
export OMP_NUM_THREADS=1 TQDM_DISABLE=1
"$PY" - "$WORK" <<'PYEOF'
import sys, yaml
work = sys.argv[1]
recipe = {
    "model": dict(image_size=32, base_channels=8, channel_mult=[1, 2], latent_dim=8, norm_groups=4),
    "quantizer": dict(codebook_size=32, restart_after_steps=2),
    "data": dict(source="shapes", shapes=dict(num_images=64, num_test_images=16, image_size=32)),
    "train": dict(output_dir=f"{work}/run", batch_size=8, max_steps=6, warmup_steps=2,
                  log_every=1, eval_every=0, save_every=0, num_threads=1),
    "eval": dict(max_images=16, batch_size=16, grid_images=4),
}
open(f"{work}/r.yaml", "w").write(yaml.safe_dump(recipe))
PYEOF
"$PY" -c "while True: pass" & B1=$!
"$PY" -c "while True: pass" & B2=$!
ok=0; hung=0; failed=0
for i in $(seq 1 "$N"); do
  rm -rf "$WORK/run"
  timeout -k 10 90 "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 \
    --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port $((29700 + i)) \
    -m vqgpt.cli train-tokenizer --config "$WORK/r.yaml" > "$WORK/log_$i.txt" 2>&1
  rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then hung=$((hung + 1)); elif [ $rc = 0 ]; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
done
kill $B1 $B2
echo "$N runs of 2 processes under load: ok $ok, hung $hung, failed $failed (logs in $WORK)"
