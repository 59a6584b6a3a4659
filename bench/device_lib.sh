# Sourced by the bench/*_device.sh scripts once $OUT (what comes back), $work (a folder for
# everything else) and $log are set.

# stage SECONDS NAME COMMAND...: run with a time limit, its output to the log; go on if it fails
stage() {
    local limit=$1 name=$2
    shift 2
    echo "== $name ($(date +%T))" >> "$log"
    timeout "$limit" "$@" >> "$log" 2>&1 || echo "== $name: exit $?" >> "$log"
}

# device_header: the GPU, its driver and the commit measured, at the top of the log
device_header() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1
    echo "commit ${COMMIT:-unknown}" >> "$log"
}

# bring_back NAME: the work folder and what is under $OUT as one tarball, $OUT/NAME.tgz (the
# device brings back at most 8 files: the scripts leave a few JSONs, the log and this)
bring_back() {
    cp "$OUT"/*.json "$log" "$work"/ 2>/dev/null
    tar czf "$OUT/$1.tgz" -C "$work" .
    ls -la "$OUT" >> "$log"
}
