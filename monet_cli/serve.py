"""`monet serve`: load the model, build the engine and the mask store, start uvicorn.

Options override MONET_* environment settings (server.settings.Settings). The engine: vLLM
when installed (--engine auto), else the plain-PyTorch runtime.

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
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["build_engine", "serve_command"]

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "monet_runtime" / "default_model"


def _vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def build_engine(settings):
    """(engine, builder) for the settings; typer.BadParameter when vLLM is asked for but
    missing."""
    import torch

    from monet_cli.builder import RuntimeProfileBuilder
    from monet_runtime import load_model

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    path = settings.model or DEFAULT_MODEL
    name = settings.served_model_name or _model_name(Path(path))
    dtype = getattr(torch, settings.dtype)
    choice = settings.engine
    if choice in ("auto", "vllm") and not _vllm_installed():
        if choice == "vllm":
            raise typer.BadParameter("vLLM is not installed (scripts/setup.sh installs it); "
                                     "use --engine runtime", param_hint="--engine")
        choice = "runtime"
    if choice == "auto":
        choice = "vllm"
    if choice == "vllm":
        from monet_runtime.vllm_engine import VllmEngine

        engine = VllmEngine(path, name=name, dtype=settings.dtype)
        return engine, RuntimeProfileBuilder(lambda: load_model(path, dtype, settings.device))
    from monet_runtime.engine import RuntimeEngine

    model = load_model(path, dtype=dtype, device=settings.device)
    return (RuntimeEngine(model, name=name, max_batch_size=settings.max_batch_size),
            RuntimeProfileBuilder(model))


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
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ...")] = None,
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
        dtype=dtype, device=device).items() if v is not None}
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
    runtime_engine, builder = build_engine(settings)
    store = open_store(settings.redis_url or settings.store_dir.expanduser(),
                       namespace=settings.store_namespace)
    app = create_app(engine=runtime_engine, store=store, settings=settings, builder=builder)
    log_event("monet.server", "listening", host=bind, port=settings.port,
              engine=type(runtime_engine).__name__)
    _serve(app, host=bind, port=settings.port, drain_timeout_s=settings.drain_timeout_s)
