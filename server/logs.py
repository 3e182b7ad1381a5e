"""Structured logs: one JSON object per line, with the request id of the request being served.

    log = logging.getLogger("monet.access")
    log.info("request", extra={"fields": {"status": 200, "profiles": ["no-python@3"]}})
Loggers: monet.access (one line per request), monet.audit (mask writes: who, when, what
changed), monet.server (everything else).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["REQUEST_ID", "audit", "configure_logging", "log_event"]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("monet", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # monet.access replaces it


def log_event(logger: str, msg: str, *, level: int = logging.INFO, **fields) -> None:
    logging.getLogger(logger).log(level, msg, extra={"fields": fields})


def audit(action: str, **fields) -> None:
    """A mask write for the audit trail: action, profile, versions, who, what changed."""
    log_event("monet.audit", action, action=action, **fields)
