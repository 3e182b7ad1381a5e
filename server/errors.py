"""Errors as JSON in the OpenAI shape, so that every client (the openai package included)
shows the message: {"error": {"message", "type", "param", "code"}}. `param` names the field
at fault; a 503 carries Retry-After.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ERROR_RESPONSES", "ApiError", "ErrorBody", "install_error_handlers"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
          421: "misdirected_request", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}
        self.type = type or _TYPES.get(status, "server_error")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 429, 503)}


def error_response(status: int, message: str, *, param: str | None = None, type: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"error": {"message": message, "type": type or _TYPES.get(status, "server_error"),
                      "param": param, "code": status}, **extra}
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


def _loc(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, param=exc.param, type=exc.type,
                          headers=exc.headers)


def _short(text: object, limit: int = 200) -> str:
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the fields. Never the input itself: it may be 16 MiB, or NaN (which JSON
    cannot carry); `detail` keeps each error's place, message and type only."""
    errors = [{"loc": [p if isinstance(p, int) else _short(p, 100) for p in e.get("loc", ())],
               "msg": _short(e.get("msg", "")),
               "type": e.get("type", "value_error")} for e in exc.errors()[:20]]
    param = _loc(errors[0]["loc"]) if errors else "body"
    message = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors[:5])
    return error_response(422, message or "invalid request", param=param, detail=errors)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
