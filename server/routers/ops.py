"""/health (process alive), /ready (engine loaded, mask store reachable), /metrics, and the
OpenAPI schema and its Swagger UI."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from server.deps import DocsKey, MetricsDep, MetricsKey, StateDep
from server.errors import ERROR_RESPONSES
from server.metrics import CONTENT_TYPE_LATEST

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, Any]:
    """The process is alive (no dependency checked)."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready; the checks say why."}})
async def ready(state: StateDep) -> Response:
    """Ready to serve: the engine is loaded and healthy, the mask store answers, and the
    server-wide default profile (if any) resolves."""
    ok, checks = await state.readiness()
    return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503,
                        headers={} if ok else {"Retry-After": "2"})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **ERROR_RESPONSES})
async def metrics(_: MetricsKey, m: MetricsDep) -> Response:
    """Prometheus text format. With API keys configured it needs one (profile names and
    traffic), unless MONET_PUBLIC_METRICS=true."""
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(_: DocsKey, request: Request) -> JSONResponse:
    """With API keys configured it needs one, unless MONET_PUBLIC_DOCS=true."""
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs(_: DocsKey, request: Request) -> HTMLResponse:
    """Swagger UI; it fetches /openapi.json without a key, so with keys it needs
    MONET_PUBLIC_DOCS=true to show anything."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs")
