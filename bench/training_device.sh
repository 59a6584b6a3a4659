#!/usr/bin/env bash
# The training-speed measurements of docs/results/bench-small in one GPU call (about 9 min):
#   0. the GPU tests of the fused scan (its CUDA-graph replay included)
#   1. bench.py at the small preset, bf16, sequence 8192, batch 4: full, window and ttt_cache at
#      block 64 (the targets' run, ratios within it)
#   2. the same for full and ttt_cache at block 128 (the largest block the recall rule allows at
#      this window of 256)
#   3. the scan's launch settings swept at block 64 (scan_kernel.py: time and agreement with the
#      reference scan; the settings after docs/results/kernel-compile-sm90's spills at block 64)
#   4. one TTT-cache attention layer profiled against the window layer (profile_cache.py)
# Under $OUT: the log, the JSONs and training.tgz with everything (the benchmarks' READMEs too).
# Usage: COMMIT=$(git rev-parse --short HEAD) bench/training_device.sh
set -u
: "${OUT:?set OUT to the folder for the results}"
work=${WORK:-/tmp/training}
log=$OUT/log.txt
mkdir -p "$work"
export PYTHONPATH=$PWD:$PWD/bench PYTHONUNBUFFERED=1
source "$(dirname "$0")/device_lib.sh"
device_header
bench=(python3 bench/bench.py --preset small --device cuda --dtype bf16 --seq 8192 --batch 4
    --no-stream --commit "${COMMIT:-unknown}")
stage 120 gpu-tests python3 -m pytest -q -m gpu tests/test_ttt_scan_triton.py
stage 150 bench-block64 "${bench[@]}" --kinds full window ttt_cache --block 64 \
    --out "$work/block64"
stage 120 bench-block128 "${bench[@]}" --kinds full ttt_cache --block 128 --out "$work/block128"
stage 90 scan-sweep python3 bench/scan_kernel.py --rows 4 --heads 8 --seq 8192 --window 256 \
    --block 64 --out "$OUT/scan-block64.json" --variants tf32x3/tf32:8:32:8:16 \
    tf32x3/tf32:8:16:8:16 tf32x3/tf32:8:64:8:16 tf32x3/tf32:4:16:8:16 tf32x3/tf32:8:32:8:32
stage 90 profile python3 bench/profile_cache.py --batch 4 --seq 8192 --window 256 --block 64 \
    --out "$work/profile-block64.json"
for f in block64/bench.json block128/bench.json profile-block64.json; do
    cp "$work/$f" "$OUT/$(echo "$f" | tr / -)" 2>/dev/null
done
bring_back training
