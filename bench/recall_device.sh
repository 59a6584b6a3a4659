#!/usr/bin/env bash
# The recall study on one GPU machine (the device call of docs/results/recall-study): the GPU tests
# of the readers in the background, then bench/recall_study.py; results and checkpoints as tarballs
# under $OUT (the device brings back at most 8 files). Usage: bench/recall_device.sh BUDGET_S [ARGS...]
# (STUDY_TIMEOUT: seconds before the study is stopped, default BUDGET_S + 250)
set -u
budget=${1:-300}; shift || true
export PYTHONPATH=$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt" 2>&1
git rev-parse HEAD >> "$OUT/device.txt" 2>/dev/null
[ -n "${GPU_TESTS:-}" ] && timeout 300 python3 -m pytest -q -m gpu tests/test_readers.py tests/test_gpu.py -p no:cacheprovider \
    > "$OUT/gpu_tests.log" 2>&1 &
timeout "${STUDY_TIMEOUT:-$((budget + 250))}" python3 bench/recall_study.py --out runs/recall --budget "$budget" "$@" 2>&1 \
    | grep --line-buffered -v "it/s\]" > "$OUT/study.log"
wait
cd runs
tar czf "$OUT/results.tgz" --exclude=model.pt --exclude=tensorboard recall
ls recall/*/model.pt 2>/dev/null | split -n r/3 - /tmp/ckpts.
for f in /tmp/ckpts.*; do tar czf "$OUT/models-${f##*.}.tgz" $(cat "$f"); done
ls -la "$OUT"
