#!/usr/bin/env bash
# The Moshi 7B serving measurements of docs/results/moshi-7b-h200, in two GPU calls:
#   diagnose (about 6 min):
#   0. the GPU tests of what serving runs: RoPE on CUDA, the step kernels, Moshi under CUDA graphs
#   1. how a captured graph runs its device-to-device copies (bench/graph_memcpy.py)
#   2. the batch-1 frame replayed under the profiler, its idle time by the kernels around it,
#      each variant in a process of its own
#   3. the TTT cache's step kernels at batch 1024 over their launch settings (step_kernels.py)
#   steady (about 8 min):
#   4. latency (three batch-1 rounds, the variants in turn) and concurrency of ttt_cache against
#      window64 at steady state (moshi_bench.py, BUDGET_S its wall-clock budget)
# The device has no network: PYLIB is a folder that holds the moshi package (a copy of the
# .venv's site-packages/moshi, carried with the call). Under $OUT: the log, the JSONs and
# serving-PART.tgz with everything (the search's table and plot too).
# Usage: COMMIT=$(git rev-parse --short HEAD) bench/serving_device.sh diagnose|steady [PYLIB]
#        [BUDGET_S]
set -u
part=${1:?diagnose or steady}
pylib=${2:-pylib}
budget=${3:-420}
: "${OUT:?set OUT to the folder for the results}"
work=${WORK:-/tmp/serving}
log=$OUT/log.txt
mkdir -p "$work"
export PYTHONPATH=$PWD:$PWD/bench:$PWD/$pylib NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1
source "$(dirname "$0")/device_lib.sh"
device_header
case $part in
diagnose)
    stage 90 gpu-tests python3 -m pytest -q -x -m "gpu or not gpu" tests/test_rope.py \
        tests/test_ttt_cache_triton.py tests/test_gpu_moshi.py
    stage 60 graph-memcpy python3 bench/graph_memcpy.py --out "$OUT/graph-memcpy.json"
    # one process per variant: the profiler may report a graph's copies differently when it
    # attached before the graph was captured (as it had for the second variant of a shared process)
    for v in window64 ttt_cache; do
        stage 100 "graph-profile $v" python3 bench/profile_moshi.py --variants "$v" \
            --batches 1 --extra-batches "" --frames 10 --profiled 0 --graph-profiled 16 \
            --out "$OUT/profile-graphs-$v.json"
    done
    stage 90 step-kernels python3 bench/step_kernels.py --batches 1024 --warps 4 \
        --vkey-chunks 32 --per-sm 4,8,16,32 --attend 16:2 --out "$OUT/step-kernels.json"
    ;;
steady)
    stage $((budget + 60)) steady python3 bench/moshi_bench.py --variants window64,ttt_cache \
        --checkpoints 1000 --latency-rounds 3 --budget-s "$budget" --out "$work/steady"
    cp "$work/steady/results.json" "$OUT/steady-results.json" 2>/dev/null
    ;;
*)
    echo "unknown part $part: diagnose or steady" >> "$log"
    ;;
esac
bring_back "serving-$part"
