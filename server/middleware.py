"""Per-request context as plain ASGI middleware (streaming and disconnects pass through):
a request id (X-Request-Id, taken from the client when sane), the body size limit (413), one
access log line, and the request counter of the generation endpoints.
"""

from __future__ import annotations

import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response
from server.logs import REQUEST_ID, log_event
from server.metrics import Metrics

__all__ = ["GENERATION_PATHS", "RequestContext", "host_name"]

GENERATION_PATHS = {"/generate": "generate", "/v1/completions": "completions",
                    "/v1/chat/completions": "chat"}
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_QUIET = {"/health", "/metrics", "/ready"}


def host_name(header: str) -> str:
    """The name of a Host header, lowercase, without its port: "[::1]:8000" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.partition(":")[0].rstrip(".")


class RequestContext:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics,
                 hosts: frozenset[str] | None = None):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.hosts = hosts  # None: any Host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        token = REQUEST_ID.set(request_id)
        state = scope.setdefault("state", {})
        state["monet_arrival"] = start = time.monotonic()
        status = {"code": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, f"body: larger than {self.max_body_bytes} bytes")
            return message

        try:
            length = headers.get("content-length", "")
            host = host_name(headers.get("host", ""))
            if self.hosts is not None and host not in self.hosts:
                self.metrics.rejected.labels("host").inc()
                response = error_response(421, f"Host: {host[:100]!r} is not served here; this "
                                               f"server accepts {', '.join(sorted(self.hosts))} "
                                               "(MONET_ALLOWED_HOSTS; without API keys only "
                                               "localhost names)", param="Host")
                await response(scope, receive, send_with_id)
            elif length.isascii() and length.isdigit() and int(length) > self.max_body_bytes:
                self.metrics.rejected.labels("body_size").inc()
                response = error_response(413, f"body: {length} bytes, the limit is "
                                               f"{self.max_body_bytes}", param="body")
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            self._record(scope, state, status["code"], time.monotonic() - start)
            REQUEST_ID.reset(token)

    def _record(self, scope: Scope, state: dict, code: int, seconds: float) -> None:
        path = scope.get("path", "")
        resolved = state.get("monet_profiles")
        profiles = resolved.header.split(",") if resolved is not None and resolved.header else []
        endpoint = GENERATION_PATHS.get(path)
        if endpoint is not None:
            # resolved profiles only (they exist); requests that fail before: "unknown"
            label = resolved.label if resolved is not None else state.get("monet_profile_label",
                                                                          "unknown")
            self.metrics.requests.labels(endpoint, label, str(code)).inc()
        if path in _QUIET and code < 400:
            return
        client = scope.get("client") or ("", 0)
        log_event("monet.access", "request", method=scope.get("method"), path=path,
                  status=code, duration_ms=round(seconds * 1000, 2), client=client[0],
                  who=state.get("monet_principal"), profiles=profiles)
