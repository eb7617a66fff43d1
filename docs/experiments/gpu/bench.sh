#!/usr/bin/env bash
# GPU device run, part 2 of 2: the benchmark with actors on the GPU, on the studies that part 1
# synthesized (same warm machine). MODELS: a trained registry carried in work/gpu/models/.
set -uo pipefail
OUT=${OUT:-/tmp/lr-out}; SITE=${SITE:-/tmp/site}; DATA=${DATA:-/tmp/lrbench/data}
MODELS=${MODELS:-work/gpu/models/registry}
export PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1 PYTHONPATH="$SITE:$PWD"
log() { echo "[$(date +%T)] $*"; }
test -d "$SITE/ray" && test -d "$DATA" || { echo "fresh machine: part 1 (setup_and_test.sh) did not run here"; exit 3; }
common=(--data "$DATA" --models "$MODELS" --size full --num-gpus 1 --read-cpus 1 --workdir /tmp/lrbench/work)
# First, as the cheapest and most telling step (the device time may run out later): where a
# study's time goes on the GPU, step by step with the device synchronised at each step
# (preprocess, forward, candidates with their copy to the host, boxes, selection + crops, grading): the
# first run found ~110 ms a study of host-side work in (c) and could not say where.
log "per-step profile of the champion on cuda (bench_stages)"
timeout 120 python3 -m lumbar_ray.bench.stages --device cuda --models "$MODELS" --imgsz 128 --data "$DATA" \
  --studies 8 --repeat 3 2>&1 | tee "$OUT/stages_gpu.log"
log "(a), (b), (c): 20 and 100 studies"
timeout 330 python3 -m lumbar_ray.bench.scoring "${common[@]}" --n 20 --scale 5 \
  --json "$OUT/bench_gpu.json" --markdown "$OUT/bench_gpu.md" 2>&1 | tee "$OUT/bench_gpu.log"
# More detector actors: each one's per-study host work (copies, selection, crops) is the limit.
for pool in ${POOLS:-2 4 6}; do
  log "(a) alone, 40 and 200 studies, $pool detector actor(s)"
  gpus=$(python3 -c "print(round(0.75 / $pool, 3))")
  timeout 150 python3 -m lumbar_ray.bench.scoring "${common[@]}" --paths a --n 40 --scale 5 --detector-pool $pool \
    --detector-gpus "$gpus" --json "$OUT/bench_gpu_a_pool$pool.json" 2>&1 | tail -25 | tee "$OUT/bench_gpu_a_pool$pool.log"
done
log "done"
