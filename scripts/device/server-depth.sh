#!/usr/bin/env bash
# The 16 KiB grid through an 8-shard server, one request at a time and DEPTH in flight
# (decision 59), on the 16-CPU GPU machine, from a prebuilt kvloft binary:
#
#   scripts/device/server-depth.sh BINARY OUTDIR [DEPTH (2)] [extra `kvloft bench gpu` arguments]
#
# Writes OUTDIR/grid.json and OUTDIR/grid.log, and prints the ratios to the contiguous ceiling
# per layout and batch: in-process staged, q1 (one at a time) and qDEPTH.
set -euo pipefail
bin="$1"; out="$2"; depth="${3:-2}"; shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
taskset -c 0-7 "$bin" bench gpu --server --server-shards 8 --layouts nhd,hnd,mla,cross_layer \
  --block-bytes 16384 --batches 64,256,1024,4096 --repetitions 7 --methods staged \
  --server-depth "$depth" --out "$out/grid.json" "$@" > "$out/grid.log" 2>&1
python3 "$(dirname "$0")/server_depth_table.py" "$out/grid.json"
