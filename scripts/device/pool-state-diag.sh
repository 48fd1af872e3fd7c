#!/usr/bin/env bash
# Diagnostic: 64/256-block server saves of cross_layer vs nhd, fresh pool vs full (evicting) pool.
B=.carry/kvloft; OUT=${OUT:-/tmp/o}; mkdir -p $OUT
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib KVLOFT_TRACE_GPU=1
run() { name=$1; shift; S=$(date +%s)
  timeout 100 taskset -c 0-7 $B bench gpu --server --server-shards 8 --block-bytes 16384 --methods staged --repetitions 9 --server-depth 2 --batches 64,256 --out $OUT/$name.json --server-log $OUT/$name.srv "$@" > $OUT/$name.log 2>&1
  echo "== $name rc=$? $(( $(date +%s)-S ))s $*"; python3 scripts/device/server_depth_table.py $OUT/$name.json | grep -v layout; python3 scripts/device/server_trace_report.py $OUT/$name.srv | grep "^save"; }
run fresh-cross --layouts cross_layer
run fresh-nhd --layouts nhd
run full-cross --layouts cross_layer --server-pool-bytes 1073741824
run full-nhd --layouts nhd --server-pool-bytes 1073741824
