#!/usr/bin/env bash
# Does a full pool or the layout slow GPU saves through the server? 64- and 256-block saves and
# loads of 32 x 16 KiB, 8 shards, one layout per server: cross-layer and NHD, each on a fresh
# 8 GiB pool and on a 1 GiB pool that is full (every save evicts) for most of the run, one
# request at a time and two in flight, with the server trace (decision 59):
#
#   scripts/device/pool-state-diag.sh BINARY OUTDIR
#
# Prints per run the ratio table (scripts/device/server_depth_table.py) and the trace's save
# medians (scripts/device/server_trace_report.py): microseconds from the request's frame to its
# slots known, its copy queued, seen done and answered. Writes OUTDIR/NAME.{json,log,srv}.
set -uo pipefail
bin="$1"; out="$2"; here="$(dirname "$0")"
mkdir -p "$out"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export KVLOFT_TRACE_GPU=1
run() {
  local name=$1; shift
  local start; start=$(date +%s)
  timeout 100 taskset -c 0-7 "$bin" bench gpu --server --server-shards 8 --block-bytes 16384 \
    --methods staged --repetitions 9 --server-depth 2 --batches 64,256 --out "$out/$name.json" \
    --server-log "$out/$name.srv" "$@" > "$out/$name.log" 2>&1
  echo "== $name rc=$? $(( $(date +%s) - start ))s $*"
  python3 "$here/server_depth_table.py" "$out/$name.json" | grep -v layout
  python3 "$here/server_trace_report.py" "$out/$name.srv" | grep "^save"
}
run fresh-cross --layouts cross_layer
run fresh-nhd --layouts nhd
run full-cross --layouts cross_layer --server-pool-bytes 1073741824
run full-nhd --layouts nhd --server-pool-bytes 1073741824
