"""The FastAPI app: an engine and a mask store in, the REST API out (OpenAPI at /docs)."""

from __future__ import annotations

from fastapi import FastAPI
from masks import MaskStore

from server.engine import Engine
from server.errors import install_error_handlers
from server.jobs import ProfileBuilder
from server.middleware import RequestContext
from server.routers import experts, generate, inspect, jobs, masks, openai, ops, tokenize, ui
from server.settings import Settings
from server.state import ServerState, lifespan

__all__ = ["create_app"]


def create_app(*, engine: Engine, store: MaskStore, settings: Settings | None = None,
               builder: ProfileBuilder | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServerState.create(engine=engine, store=store, settings=settings, builder=builder)
    app = FastAPI(title="monet-serve", version="0.1.0", lifespan=lifespan,
                  description="MONET language models with per-request expert mask profiles.",
                  docs_url=None, redoc_url=None, openapi_url=None)  # ops.py: behind DocsKey
    app.state.monet = state
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes,
                       metrics=state.metrics, hosts=settings.host_names())
    install_error_handlers(app)
    for module in (generate, openai, tokenize, masks, jobs, inspect, experts, ops):
        app.include_router(module.router)
    ui.install(app)  # /ui: the web page, its assets
    return app
