"""JSON request bodies parsed and validated in a worker thread, not on the event loop: a
16 MiB body (a mask with millions of pairs) takes seconds to validate, and /health and every
stream would stall behind it. The routers use BodyInThread as their route class; the
endpoint signatures (and so the OpenAPI schema) stay as they are. A large mask body goes to
a child process instead: the GIL is the limit there, not the event loop.
"""

from __future__ import annotations

import asyncio
import email.message
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from server.errors import ApiError

__all__ = ["BodyInThread"]


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False  # FastAPI's strict content type: no header, no JSON
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


LARGE = 1 << 20  # bodies above this with a `compacted` form validate in a child process
_pool: ProcessPoolExecutor | None = None


def _errors(e: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": ("body", *err["loc"]), "msg": err["msg"], "type": err["type"]}
            for err in e.errors(include_url=False)[:20]]


def _validate(model: type[BaseModel], raw: bytes) -> BaseModel:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(_errors(e)) from None


def _validate_compacted(model: type[BaseModel], raw: bytes) -> BaseModel | list[dict]:
    """In the child: the instance in its compacted form (numpy arrays instead of millions
    of lists, cheap to send back), or the errors."""
    try:
        return model.model_validate_json(raw).compacted()
    except ValidationError as e:
        return _errors(e)


def _exit_with(server: int) -> None:
    """The validating child's initializer: it ends when its server does. `monet serve`
    leaves by os._exit (no atexit, so no pool shutdown) and a killed server shuts down
    nothing: the orphaned child stayed, holding its memory (300 MB), until the machine's
    next reboot."""
    def watch() -> None:
        while os.getppid() == server:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-server", daemon=True).start()


def _new_pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                               initializer=_exit_with, initargs=(os.getpid(),))


async def _validate_large(model: type[BaseModel], raw: bytes) -> BaseModel:
    """pydantic holds the GIL for long stretches of a 16 MiB body, which a worker thread
    cannot hide from the event loop (measured: /health 7-8 s); a child process can."""
    global _pool
    if _pool is None:
        _pool = _new_pool()
    try:
        result = await asyncio.wrap_future(_pool.submit(_validate_compacted, model, raw))
    except BrokenProcessPool:  # the child died (killed, out of memory): a new one next time
        _pool = None
        raise ApiError(503, "body: the validating process failed; retry",
                       headers={"Retry-After": "1"}) from None
    if isinstance(result, list):
        raise RequestValidationError(result)
    return result


class BodyInThread(APIRoute):
    """An APIRoute whose model body is validated with model_validate_json in a thread (in a
    child process when large and the model has a `compacted` form); FastAPI then gets the
    model instance itself (validating it again costs nothing)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        model = field.field_info.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return handler
        compacts = hasattr(model, "compacted")

        async def route(request: Request) -> Response:
            raw = await request.body()
            if raw and _is_json(request.headers.get("content-type")):
                large = compacts and len(raw) > LARGE
                request._json = await (_validate_large(model, raw) if large
                                       else asyncio.to_thread(_validate, model, raw))
            return await handler(request)

        return route
