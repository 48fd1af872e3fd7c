#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh --release) and runs the server on the discovered
# topology. Extra arguments go to `kvloft serve`, for example:
#   scripts/serve.sh --config config/single-gpu.toml
#   scripts/serve.sh --socket /tmp/kvloft.sock --pool-size 4GiB
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --release
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
exec target/release/kvloft serve "$@"
