#!/usr/bin/env bash
# The stationarity study on one GPU (small preset): the four memories train as parallel processes,
# then each streams the held-out split to 64 x its training length. The corpus travels with the
# call (prepared here, copied to CORPUS). Results as a tarball and the log under $OUT.
# Usage: bench/stationarity_device.sh BUDGET_S CORPUS
set -u
budget=${1:-150}
corpus=${2:-data/corpus}
export PYTHONPATH=$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt" 2>&1
timeout "$budget" python3 -m moshi_ttt.cli study --preset stationarity-small --jobs 4 --device cuda \
    --data "$corpus" --out runs/stationarity-small 2>&1 | grep --line-buffered -av "it/s\]" > "$OUT/study.log"
cd runs && tar czf "$OUT/results.tgz" --exclude=model.pt --exclude=tensorboard --exclude=train_state.pt \
    stationarity-small
ls -la "$OUT"
