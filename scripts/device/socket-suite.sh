#!/usr/bin/env bash
# The socket suite on the H100 test box: 1, 2 and 8 shards on the highest CPUs, the bench's
# clients on CPUs 0-7.   scripts/device/socket-suite.sh BINARY OUTDIR
set -euo pipefail
bin="$1"; out="$2"; here="$(dirname "$0")"
mkdir -p "$out"
for n in 1 2 8; do
  taskset -c 0-7 "$bin" bench socket --config "$here/h100-shards-$n.toml" --repetitions 5000 --seconds 5 \
    --clients-per-shard 2 --out "$out/socket-${n}shard.json" --plot "$out/socket-${n}shard.svg" 2>&1 | tail -6
done
