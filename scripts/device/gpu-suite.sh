#!/usr/bin/env bash
# Runs the GPU data-path suite on a machine with an NVIDIA GPU, from a prebuilt kvloft binary
# (no cargo needed there):
#
#   scripts/device/gpu-suite.sh BINARY OUTDIR [extra `kvloft bench gpu` arguments]
#
# Prints the machine (GPU, driver, libraries the binary loads), runs `kvloft bench gpu` (every
# layout round-tripped and verified, then timed: copy kernel, DMA, the planner's choice, and
# the contiguous ceiling) and writes OUTDIR/gpu.json and OUTDIR/gpu.log.
set -euo pipefail
bin="$1"; out="$2"; shift 2
mkdir -p "$out"
# libnvrtc for the copy kernel: the CUDA toolkit's lib64, wherever it is.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
{
  nvidia-smi -L || true
  nvidia-smi --query-gpu=driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv || true
  echo "--- ldd $bin"; ldd "$bin" | grep -E "not found|hwloc|udev" || true
  ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -3 || true
} 2>&1 | tee "$out/machine.txt"
"$bin" bench gpu --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
