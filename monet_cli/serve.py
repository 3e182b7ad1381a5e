"""`monet serve`: load the model, build the engine and the mask store, start uvicorn.

Options override MONET_* environment settings (server.settings.Settings). The engine: vLLM
when installed (--engine auto), else the plain-PyTorch runtime; an engine option the chosen
engine cannot honour is refused before anything loads (engine_options).

SIGTERM (or Ctrl-C) drains: new generations get 503, running ones finish (or end with
finish_reason "abort" just before the drain timeout), then the process exits 0. OpenMP threads
sleep at barriers instead of spinning (OMP_WAIT_POLICY=PASSIVE unless set): spinning threads
made every decode step several times slower whenever another process held a core.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["build_engine", "choose_engine", "engine_options", "serve_command"]

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "monet_runtime" / "default_model"


def _vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


# Settings only the vLLM engine honours; the runtime engine refuses them.
VLLM_ONLY = ("tensor_parallel_size", "gpu_memory_utilization", "kv_cache_bytes", "mask_slots",
             "compiled", "sparse_experts")


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _refuse(name: str, why: str) -> typer.BadParameter:
    return typer.BadParameter(f"{why} (MONET_{name.upper()})", param_hint=_option(name))


def choose_engine(settings) -> str:
    """"runtime" or "vllm": --engine auto is vLLM where it is installed; BadParameter when
    vLLM is asked for but missing."""
    if settings.engine == "runtime":
        return "runtime"
    if _vllm_installed():
        return "vllm"
    if settings.engine == "vllm":
        raise typer.BadParameter("vLLM is not installed (scripts/setup.sh installs it); "
                                 "use --engine runtime", param_hint="--engine")
    return "runtime"


def engine_options(settings, engine: str, *, platform: str | None = None) -> dict:
    """The chosen engine's keyword arguments from the settings, before anything loads.
    BadParameter naming the option for one the engine cannot honour: a vLLM option on the
    runtime engine, threads on vLLM, a device other than vLLM's platform (`platform`, vLLM's
    device type: "cpu" or "cuda"), or a max_model_len beyond the model's positions."""
    from monet_runtime.config import MonetConfig

    positions = MonetConfig.from_file(settings.model or DEFAULT_MODEL).max_position_embeddings
    if settings.max_model_len is not None and settings.max_model_len > positions:
        raise _refuse("max_model_len", f"{settings.max_model_len} is beyond the model's "
                      f"{positions} positions")
    if engine == "runtime":
        for name in VLLM_ONLY:
            if getattr(settings, name) is not None:
                raise _refuse(name, "a vLLM option, which the runtime engine cannot honour: "
                              "drop it or use --engine vllm")
        return {"max_batch_size": settings.max_batch_size or 16,
                "max_model_len": settings.max_model_len}
    if settings.threads is not None:
        raise _refuse("threads", "vLLM's CPU worker binds its OpenMP threads itself (set "
                      "VLLM_CPU_OMP_THREADS_BIND); drop it or use --engine runtime")
    device = settings.device
    if device is not None and device not in (platform, f"{platform}:0"):
        raise _refuse("device", f"{device!r}: vLLM runs on its platform, {platform!r} here "
                      "(pick a GPU with CUDA_VISIBLE_DEVICES); drop it or use --engine runtime")
    if settings.gpu_memory_utilization is not None and platform == "cpu":
        raise _refuse("gpu_memory_utilization", "vLLM on CPU has no GPU memory; its KV cache "
                      "is --kv-cache-bytes")
    return {"max_num_seqs": settings.max_batch_size or 64,
            "max_model_len": settings.max_model_len,
            "tensor_parallel_size": settings.tensor_parallel_size or 1,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "kv_cache_bytes": settings.kv_cache_bytes,
            "mask_slots": settings.mask_slots or 8,
            "compiled": platform != "cpu" if settings.compiled is None else settings.compiled,
            "sparse_experts": settings.sparse_experts is not False}


def build_engine(settings):
    """(engine, builder) for the settings; typer.BadParameter, before the model loads, for
    vLLM asked for but missing or an option the engine cannot honour."""
    engine = choose_engine(settings)
    platform = None
    if engine == "vllm":
        from vllm.platforms import current_platform

        platform = current_platform.device_type
    options = engine_options(settings, engine, platform=platform)

    import torch

    from monet_cli.builder import RuntimeProfileBuilder
    from monet_runtime import load_model

    path = settings.model or DEFAULT_MODEL
    name = settings.served_model_name or _model_name(Path(path))
    dtype = getattr(torch, settings.dtype)
    if engine == "vllm":
        from monet_runtime.vllm_engine import VllmEngine

        served = VllmEngine(path, name=name, dtype=settings.dtype, **options)
        return served, RuntimeProfileBuilder(lambda: load_model(path, dtype, platform))
    from monet_runtime.engine import RuntimeEngine

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    model = load_model(path, dtype=dtype, device=settings.device or "cpu")
    return RuntimeEngine(model, name=name, **options), RuntimeProfileBuilder(model)


def _serve(app, *, host: str, port: int, drain_timeout_s: float) -> None:
    """uvicorn; the first SIGTERM / SIGINT drains the app (still listening, 503 for new
    generations), then stops the server (exit status 0); a second one stops it at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state = app.state.monet
            if self.started and not self.should_exit and not state.service.admission.draining:
                # the handler runs in the loop's thread, between its callbacks
                asyncio.get_running_loop().call_soon(state.begin_drain, self.stop)
                return
            super().handle_exit(sig, frame)

        def stop(self) -> None:
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=max(1.0, 0.1 * drain_timeout_s))
    server = DrainingServer(config)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the app did not start
    # Everything is closed. Skip the interpreter's teardown: collecting torch's objects took
    # 2 s, and 9 s with two busy processes on the cores, after the server had finished.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _model_name(path: Path) -> str:
    path = path.resolve()
    if path == DEFAULT_MODEL:
        return "monet-default"
    return path.parent.name if path.name == "model" else path.name


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    model: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: the "
                                               "bundled model).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Mask store on Redis (default: the "
                                                   "embedded local store).")] = None,
    store_dir: Annotated[Path | None, typer.Option(help="Embedded store directory "
                                                   "(default ~/.local/share/monet/masks).")] = None,
    engine: Annotated[str | None, typer.Option(
        help="runtime, vllm or auto (default: vllm if installed).")] = None,
    default_profile: Annotated[str | None, typer.Option(
        help="Profile(s) applied to every request, comma-separated.")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Name in /v1/models.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16.")] = None,
    device: Annotated[str | None, typer.Option(
        help="Runtime: cpu (default), cuda, cuda:1 ...; vLLM: its platform only.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(
        help="Requests running at once: the runtime's batch (16), vLLM's max_num_seqs (64).")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(
        help="Prompt plus output tokens per request (default: the model's positions).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads (runtime engine only).")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(
        help="vLLM: GPUs to shard the attention over (1).")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        help="vLLM on a GPU: share of its memory for weights and KV cache (0.9).")] = None,
    kv_cache_bytes: Annotated[int | None, typer.Option(
        help="vLLM: KV-cache size in bytes (CPU default 1 GiB).")] = None,
    mask_slots: Annotated[int | None, typer.Option(
        help="vLLM: distinct mask profiles running at once (8).")] = None,
    compiled: Annotated[bool | None, typer.Option(
        "--compiled/--eager", help="vLLM: torch.compile and CUDA graphs (default on a GPU; "
        "eager on CPU).")] = None,
    sparse_experts: Annotated[bool | None, typer.Option(
        "--sparse-experts/--dense-experts", help="vLLM on CPU: the expert layers on the "
        "runtime's sparse path (default), or dense on vLLM's prepacked linear layers: "
        "faster from batches of about 32, with no sparse path below.")] = None,
):
    """Serve a MONET model over HTTP (OpenAPI at /docs). Every option is also a MONET_*
    environment variable; see server/settings.py for the rest (keys, limits)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads its OpenMP
    from pydantic import ValidationError

    from masks import open_store
    from server.logs import configure_logging, log_event
    from server.main import create_app
    from server.settings import LOOPBACK, Settings

    given = {k: v for k, v in dict(
        model=model, host=host, port=port, redis_url=redis_url, store_dir=store_dir,
        engine=engine, default_profile=default_profile, served_model_name=served_model_name,
        dtype=dtype, device=device, max_batch_size=max_batch_size, max_model_len=max_model_len,
        threads=threads, tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, kv_cache_bytes=kv_cache_bytes,
        mask_slots=mask_slots, compiled=compiled,
        sparse_experts=sparse_experts).items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as e:
        raise typer.BadParameter(str(e)) from None
    configure_logging(settings.log_level)
    bind = settings.host
    if not settings.auth_enabled:
        if not _loopback(bind):
            log_event("monet.server", f"no API keys configured: refusing to bind {bind}; "
                      f"binding to {LOOPBACK} only (set MONET_API_KEYS / MONET_ADMIN_KEYS)",
                      level=logging.WARNING)
            bind = LOOPBACK
        else:
            log_event("monet.server", f"no API keys configured: serving on {bind} (localhost "
                      "only) without authentication", level=logging.WARNING)
    started = time.monotonic()
    runtime_engine, builder = build_engine(settings)
    engine_s = time.monotonic() - started
    store = open_store(settings.redis_url or settings.store_dir.expanduser(),
                       namespace=settings.store_namespace)
    app = create_app(engine=runtime_engine, store=store, settings=settings, builder=builder)
    # the start-up's phases (benchmarks/bench_startup.py): the engine (its imports, loading,
    # start), then the store and the app
    log_event("monet.server", "listening", host=bind, port=settings.port,
              engine=type(runtime_engine).__name__, engine_s=round(engine_s, 2),
              app_s=round(time.monotonic() - started - engine_s, 2))
    _serve(app, host=bind, port=settings.port, drain_timeout_s=settings.drain_timeout_s)
