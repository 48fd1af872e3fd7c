#!/usr/bin/env bash
# Runs a command under CUPTI activity tracing (scripts/device/cupti_trace.c, built here with the
# machine's CUPTI) and prints scripts/device/cupti_report.py's per-request GPU timelines. Every
# process of the command that loads the CUDA driver writes its own trace: a `kvloft bench gpu
# --server` run gives one for the bench (its in-process copies) and one for the server.
#
#   scripts/device/gpu-trace.sh OUT_DIR COMMAND...
#
# OUT_DIR receives cupti_trace.so, trace.<pid>.txt per process and report.txt (with --full
# timelines). Tracing costs the traced threads about a microsecond per driver call; compare
# timings with an untraced run of the same command.
set -euo pipefail
out=$1
shift
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"

cupti=${CUPTI:-}
for c in "$cupti" /usr/local/cuda/extras/CUPTI /usr/local/cuda; do
  if [ -n "$c" ] && [ -f "$c/include/cupti_activity.h" ]; then cupti=$c; break; fi
done
if [ ! -f "$cupti/include/cupti_activity.h" ]; then
  echo "gpu-trace: no CUPTI headers found; set CUPTI to the directory holding include/cupti.h" >&2
  exit 1
fi
libdir=$(dirname "$(find -L "$cupti" /usr/local/cuda/lib64 -name 'libcupti.so*' 2>/dev/null | head -1)")
newest() { grep -ho "} $1[0-9]*;" "$cupti"/include/cupti*.h | tr -d '}; ' | sort -V | tail -1; }
memcpy_t=$(newest CUpti_ActivityMemcpy)
kernel_t=$(newest CUpti_ActivityKernel)
gcc -O2 -shared -fPIC -o "$out/cupti_trace.so" "$here/cupti_trace.c" \
  -I"$cupti/include" -I/usr/local/cuda/include -L"$libdir" -lcupti \
  -DMEMCPY_T="$memcpy_t" -DKERNEL_T="$kernel_t"
echo "gpu-trace: CUPTI at $cupti ($memcpy_t, $kernel_t)" >&2

CUDA_INJECTION64_PATH="$out/cupti_trace.so" KVLOFT_CUPTI_OUT="$out/trace" \
  LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}" "$@"
sleep 2
python3 "$here/cupti_report.py" --full "$out"/trace.*.txt > "$out/report.txt"
python3 "$here/cupti_report.py" "$out"/trace.*.txt
