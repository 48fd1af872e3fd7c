#!/usr/bin/env bash
# Runs the real fuzzer (cargo-fuzz, libFuzzer with AddressSanitizer) on a target of fuzz/.
#
#   scripts/fuzz.sh [SECONDS [TARGET [LIBFUZZER_ARGS...]]]
#
# SECONDS defaults to 60, TARGET to frame_decoder. Inputs the fuzzer finds go to
# fuzz/corpus-new/TARGET (ignored by git), the committed seeds in fuzz/corpus/TARGET are read only;
# a crash is written to fuzz/artifacts/TARGET/ and the script exits non-zero. Replay one with
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET artifacts/TARGET/crash-...
# CI runs the same fuzz bodies on stable without libFuzzer: engine/tests/frame_fuzz_smoke.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

seconds=${1:-60}
target=${2:-frame_decoder}
shift $(($# < 2 ? $# : 2))

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> cargo install cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes -Z flags (-Zsanitizer=address, coverage passes) that only a nightly compiler
# takes; RUSTC_BOOTSTRAP=1 lets the project's stable toolchain accept them (a nightly ignores it).
export RUSTC_BOOTSTRAP=1

cd fuzz
mkdir -p "corpus-new/$target"
exec cargo fuzz run "$target" "corpus-new/$target" "corpus/$target" -- \
    -max_total_time="$seconds" "$@"
