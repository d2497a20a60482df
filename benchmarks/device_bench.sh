#!/usr/bin/env bash
# Run the method benchmark's plan on a lent GPU machine, detached (setsid) so that it outlives one device call, and
# hand back what has finished so far. After `benchmarks/device_setup.sh` has made the machine ready, in each call:
#
#   bash benchmarks/device_bench.sh WATCH_SECONDS
#
# starts the plan if it is not running yet (the sweep skips finished jobs, so a call on a fresh machine with the run
# folders carried back resumes), prints progress every 30 s for WATCH_SECONDS, then writes the run folders without
# checkpoints, pools and weights to $OUT/bench.tgz (`--report-only` reports them here) and the failures' stderr ends.
set -uo pipefail
watch=${1:?usage: bash benchmarks/device_bench.sh WATCH_SECONDS}
. /tmp/dfkit/env.sh || exit 1
plan=${PLAN:-benchmarks/plans/method-v2.json}
runs=${RUNS:-runs/bench_v2}
mkdir -p "$runs"
if ! pgrep -f "digitsdg_table.py --plan" >/dev/null; then
  setsid nohup python3 benchmarks/digitsdg_table.py --plan "$plan" --steps 1000 --checkpoint-freq 100 --n-trials 3 \
    --device cuda --n-parallel "${N_PARALLEL:-16}" --output-dir "$runs" --hparams '{"batch_size": 32}' \
    --name method-digitsdg-v2 >/tmp/dfkit/bench.log 2>&1 </dev/null &
  echo "device_bench: started the plan ($(python3 -c "import json; print(len(json.load(open('$plan'))))") rows)"
fi
end=$((SECONDS + watch))
while [ "$SECONDS" -lt "$end" ]; do
  sleep 30
  echo "$(date +%T) done $(ls "$runs"/*/done 2>/dev/null | wc -l), training $(pgrep -fc 'domainfusion train'), GPU" \
    "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
done
for err in "$runs"/*/err.txt; do
  if grep -q Traceback "$err"; then echo "== failed: $err"; grep -v Warning "$err" | tail -4; fi
done | head -60
tar czf "$OUT/bench.tgz" --exclude=checkpoint --exclude='pool*' --exclude=cdga_pool --exclude='dsi*' \
  --exclude='*.safetensors' --exclude='*.lock' "$runs"
cp /tmp/dfkit/bench.log "$OUT/bench.log" 2>/dev/null
ls -la "$OUT"
