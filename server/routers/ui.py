"""/ui: the web page (plain HTML, CSS and JavaScript modules shipped in server/ui/, no CDN).

The shell holds no data, so it is served without a key; every data call the page makes goes
through the API with the key the user enters (kept in the tab's sessionStorage). A strict
Content-Security-Policy keeps the page to this origin: nothing is fetched from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["UI_DIR", "install", "router"]

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.get("/ui")
async def page() -> FileResponse:
    """The single page; its views are hash routes (#/playground, #/routing, ...)."""
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/ui/")
async def slash() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=308)


class _Assets(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/assets", _Assets(directory=UI_DIR, html=False), name="ui-assets")
