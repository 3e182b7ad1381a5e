"""Server-sent events: `data: <json>` per chunk, `data: [DONE]` at the end (as OpenAI)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server.errors import ApiError
from server.logs import log_event

__all__ = ["sse_response"]


def _event(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def sse_response(chunks: AsyncIterator[dict[str, Any]], *, headers: dict[str, str],
                 on_close: Callable[[], None]) -> StreamingResponse:
    """Stream the chunks; an error after the first byte becomes an error event. on_close runs
    however the stream ends (even if it never started)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield _event(chunk)
        except ApiError as e:
            yield _event({"error": {"message": e.message, "type": e.type, "param": e.param,
                                    "code": e.status}})
        except Exception as e:  # noqa: BLE001 - the status line is gone; tell the client
            log_event("monet.server", "stream failed", level=logging.ERROR, error=repr(e))
            yield _event({"error": {"message": f"generation failed: {e}",
                                    "type": "server_error", "param": None, "code": 500}})
        finally:
            await chunks.aclose()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **headers},
                             background=BackgroundTask(on_close))
