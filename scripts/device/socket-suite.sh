#!/usr/bin/env bash
# The socket suite on the H100 test box: 1, 2 and 8 shards on the highest CPUs, the bench's
# clients on CPUs 0-7. SERVER_SPIN_US goes into `[server] spin-us`, CLIENT_SPIN_US is the bench
# clients' polling before they sleep (defaults: 100 and 100, the shipped defaults).
#   scripts/device/socket-suite.sh BINARY OUTDIR [SERVER_SPIN_US [CLIENT_SPIN_US [SHARD_COUNTS]]]
set -euo pipefail
bin="$1"; out="$2"; server_spin="${3:-100}"; client_spin="${4:-100}"; counts="${5:-1 2 8}"
here="$(dirname "$0")"
mkdir -p "$out"
for n in $counts; do
  cfg="$out/h100-shards-$n-spin$server_spin.toml"
  { printf '[server]\nspin-us = %s\n' "$server_spin"; cat "$here/h100-shards-$n.toml"; } > "$cfg"
  tag="${n}shard-spin${server_spin}-${client_spin}"
  echo "== $n shard(s), server spin-us $server_spin, client spin $client_spin us"
  taskset -c 0-7 "$bin" bench socket --config "$cfg" --repetitions 5000 --seconds 5 \
    --clients-per-shard 2 --client-spin-us "$client_spin" \
    --out "$out/socket-$tag.json" --plot "$out/socket-$tag.svg" 2>&1 | tail -5
done
