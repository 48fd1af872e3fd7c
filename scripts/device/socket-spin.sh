#!/usr/bin/env bash
# The socket suite with shards spinning before they park (KVLOFT_SPIN_US), 1, 2 and 8 shards.
#   scripts/device/socket-spin.sh BINARY OUTDIR SPIN_US
set -euo pipefail
bin="$1"; out="$2"; spin="$3"; here="$(dirname "$0")"
mkdir -p "$out"
for n in 1 2 8; do
  KVLOFT_SPIN_US="$spin" taskset -c 0-7 "$bin" bench socket --config "$here/h100-shards-$n.toml" --repetitions 5000 \
    --seconds 5 --clients-per-shard 2 --out "$out/socket-${n}shard-spin${spin}.json" \
    --plot "$out/socket-${n}shard-spin${spin}.svg" 2>&1 | tail -6
done
