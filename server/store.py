"""The mask store as the server uses it: every operation timed and its failures counted.

`track_misses()` tells a caller whether a ProfileCache lookup had to read the store: the cache
calls `get` only on a miss, and the flag travels into the worker thread with the context.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from masks import MaskProfile, MaskStore, ProfileSummary, StoreUnavailable, Written
from masks.store import Artifact

from server.metrics import Metrics

__all__ = ["InstrumentedStore", "track_misses"]

T = TypeVar("T")
_MISS: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("miss", default=None)


@contextlib.contextmanager
def track_misses() -> Iterator[list[bool]]:
    """Yields [False]; it turns True when a store `get` runs within (threads included)."""
    flag = [False]
    token = _MISS.set(flag)
    try:
        yield flag
    finally:
        _MISS.reset(token)


class InstrumentedStore:
    """A MaskStore that records latency and errors per operation (implements MaskStore)."""

    def __init__(self, store: MaskStore, metrics: Metrics):
        self.inner = store
        self.metrics = metrics

    def __repr__(self) -> str:
        return repr(self.inner)

    def _call(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except StoreUnavailable:
            self.metrics.store_errors.labels(operation).inc()
            self.metrics.store_up.set(0)
            raise
        finally:
            self.metrics.store_latency.labels(operation).observe(time.perf_counter() - start)

    def get(self, name: str, version: int | None = None) -> MaskProfile:
        flag = _MISS.get()
        if flag is not None:
            flag[0] = True
        return self._call("get", self.inner.get, name, version)

    def put(self, profile: MaskProfile, *, expected_version: int | None = None) -> MaskProfile:
        return self._call("put", self.inner.put, profile, expected_version=expected_version)

    def write(self, profile: MaskProfile, *, expected_version: int | None = None) -> Written:
        return self._call("put", self.inner.write, profile, expected_version=expected_version)

    def delete(self, name: str, *, expected_version: int | None = None) -> int:
        return self._call("delete", self.inner.delete, name, expected_version=expected_version)

    def list(self) -> list[ProfileSummary]:
        return self._call("list", self.inner.list)

    def versions(self, name: str) -> list[int]:
        return self._call("versions", self.inner.versions, name)

    def current_seq(self) -> int:
        return self._call("current_seq", self.inner.current_seq)

    def head(self) -> tuple[int, str]:
        return self._call("head", self.inner.head)

    def changes(self, since: int = 0):
        return self._call("changes", self.inner.changes, since)

    def watch(self, since: int | None = None):
        return self.inner.watch(since)

    def put_artifact(self, name: str, data: bytes) -> str:
        return self._call("put_artifact", self.inner.put_artifact, name, data)

    def get_artifact(self, name: str) -> Artifact:
        return self._call("get_artifact", self.inner.get_artifact, name)

    def artifact_digest(self, name: str) -> str:
        return self._call("artifact_digest", self.inner.artifact_digest, name)

    def delete_artifact(self, name: str) -> bool:
        return self._call("delete_artifact", self.inner.delete_artifact, name)

    def ping(self) -> None:
        self._call("ping", self.inner.ping)
        self.metrics.store_up.set(1)

    def close(self) -> None:
        self.inner.close()
