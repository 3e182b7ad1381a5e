"""/health (process alive), /ready (engine loaded, mask store reachable), /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from server.deps import MetricsDep, StateDep
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
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(m: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
