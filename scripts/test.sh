#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs every test: formatting, clippy, the Rust
# unit and integration tests (which start real servers), and the Python tests, including the
# vLLM connector's end-to-end tests on vLLM for CPU (scripts/setup-vllm.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-vllm.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo test"
cargo test --workspace --locked
say "python tests (with the vLLM end-to-end tests)"
KVLOFT_BIN="$PWD/target/debug/kvloft" KVLOFT_REQUIRE_VLLM=1 .venv/bin/python -m pytest -q python/tests
