"""JSON request bodies parsed and validated in a worker thread, not on the event loop: a
16 MiB body (a mask with millions of pairs) takes seconds to validate, and /health and every
stream would stall behind it. The routers use BodyInThread as their route class; the
endpoint signatures (and so the OpenAPI schema) stay as they are.
"""

from __future__ import annotations

import asyncio
import email.message
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

__all__ = ["BodyInThread"]


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False  # FastAPI's strict content type: no header, no JSON
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


def _validate(model: type[BaseModel], raw: bytes) -> BaseModel:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors) from None


class BodyInThread(APIRoute):
    """An APIRoute whose model body is validated with model_validate_json in a thread; FastAPI
    then gets the model instance itself (validating it again costs nothing)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        model = field.field_info.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return handler

        async def route(request: Request) -> Response:
            raw = await request.body()
            if raw and _is_json(request.headers.get("content-type")):
                request._json = await asyncio.to_thread(_validate, model, raw)
            return await handler(request)

        return route
