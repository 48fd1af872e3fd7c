#!/usr/bin/env bash
# Installs everything kvloft needs on a Debian/Ubuntu machine and builds it:
# system packages (apt), the Rust toolchain (rustup, when cargo is missing), the workspace, and
# the Python package in a virtual environment at .venv.
#
#   scripts/setup.sh            debug build
#   scripts/setup.sh --release  release build (what scripts/serve.sh runs)
set -euo pipefail
cd "$(dirname "$0")/.."

profile_flag=""
[ "${1:-}" = "--release" ] && profile_flag="--release"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "run as root or install sudo" >&2; exit 1; }
  SUDO="sudo"
fi

# System packages: C toolchain and the libraries the -sys crates link (hwloc, ibverbs, udev),
# libclang for bindgen, Python with venv for the client package and its tests.
packages=(build-essential pkg-config cmake curl ca-certificates git libclang-dev libhwloc-dev
  libibverbs-dev libnl-3-dev libnl-route-3-dev libudev-dev python3 python3-venv python3-pip)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Rust: use the toolchain on PATH, else install rustup's stable toolchain.
if ! command -v cargo >/dev/null; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null; then
  say "installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  . "$HOME/.cargo/env"
fi

say "building the workspace ${profile_flag:-(debug)}"
cargo build --workspace --locked $profile_flag

# Python: a virtual environment keeps the client package and test tools off the system Python.
if [ ! -x .venv/bin/python ]; then
  say "creating the Python virtual environment .venv"
  python3 -m venv .venv
fi
say "installing the kvloft Python package"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e "python[dev]"
