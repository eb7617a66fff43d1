#!/usr/bin/env bash
# GPU device run, part 1 of 2 (see README.md here): install the carried wheels, synthesize the
# realistic-size benchmark studies in the background, and run the GPU tests.
# Run from the repository root on the GPU machine; writes logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/lr-out}; SITE=${SITE:-/tmp/site}; DATA=${DATA:-/tmp/lrbench/data}; N_DATA=${N_DATA:-400}
export PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1
log() { echo "[$(date +%T)] $*"; }
log "$(python3 -V) on $(nproc) CPUs"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$SITE" "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" work/gpu/wheels/*.whl || exit 2
tar xJf work/gpu/wheels/ray-slim.tar.xz -C "$SITE" || exit 2
export PYTHONPATH="$SITE:$PWD"
python3 -c "import ray, ultralytics, pydicom, torch, numpy; print('ray', ray.__version__, 'ultralytics', ultralytics.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" || exit 3
log "synthesizing $N_DATA full-size studies into $DATA (background)"
( python3 -c "
import sys, time; from lumbar_ray import synth
t = time.perf_counter(); synth.synthesize('$DATA', n_studies=$N_DATA, seed=3, split='test', size='full', workers=10)
print(f'synthesized $N_DATA studies in {time.perf_counter() - t:.0f} s')" > "$OUT/synth.log" 2>&1; echo "rc $?" >> "$OUT/synth.log" ) &
SYNTH=$!
log "GPU tests"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_detector.py 2>&1 | tee "$OUT/pytest_gpu.log"
log "waiting for synthesis"; wait $SYNTH; cat "$OUT/synth.log"; du -sh "$DATA"
log "done"
