"""An in-memory cache of mask profiles for one model, kept current by a store's watch.

A replica asks `get(name)` per request: a dict lookup when cached, a store read otherwise.
Change events (polled by `refresh()`, or by the thread `start()` runs) drop entries that a
newer version or a delete made stale; RESET (the store emptied, restored or replaced) drops
everything, and a read that straddled it is not kept. Failing closed: when the watch has not
reached the store for `max_staleness` seconds, `get` raises StoreUnavailable rather than serve a
profile that may have changed or been deleted meanwhile. The watch thread survives any error:
it records it (`last_error`, for /ready), resynchronises and retries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from masks.schema import MaskProfile, check_model
from masks.store import RESET, ChangeEvent, MaskStore, StoreUnavailable, Watch

__all__ = ["ProfileCache"]

_log = logging.getLogger("monet.masks")


class ProfileCache:
    def __init__(
        self,
        store: MaskStore,
        *,
        model_id: str | None = None,
        max_entries: int = 256,
        max_staleness: float = 10.0,
        poll_timeout: float = 1.0,
    ):
        self.store = store
        self.model_id = model_id
        self.max_entries = max_entries
        self.max_staleness = max_staleness
        self.poll_timeout = poll_timeout
        self._latest: OrderedDict[str, MaskProfile] = OrderedDict()
        self._known: dict[str, int] = {}  # newest version (or delete) seen in events
        self._resets = 0  # RESETs applied: a read begun before one is not cached
        self._lock = threading.Lock()
        self._watch: Watch | None = None
        self._last_sync = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error: Exception | None = None

    # ---- reading -------------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> MaskProfile:
        """The latest (or a given) version; ProfileNotFound, StoreUnavailable, ModelMismatch."""
        self._check_fresh()
        with self._lock:
            resets = self._resets
            cached = self._latest.get(name) if version is None else None
            if cached is not None:
                self._latest.move_to_end(name)
                return cached
        profile = self.store.get(name, version)
        if self.model_id is not None:
            check_model(profile, self.model_id)
        if version is None:
            with self._lock:
                if resets == self._resets and profile.version >= self._known.get(name, 0):
                    self._latest[name] = profile
                    while len(self._latest) > self.max_entries:
                        self._latest.popitem(last=False)
        return profile

    def _check_fresh(self) -> None:
        if self._watch is None:
            return  # not watching: every miss reads the store, hits are the caller's choice
        age = time.monotonic() - self._last_sync
        if age > self.max_staleness:
            raise StoreUnavailable(f"mask store not reached for {age:.0f} s "
                                   f"({self.last_error}); refusing possibly stale profiles")

    # ---- keeping current -----------------------------------------------------------------
    def apply(self, events: list[ChangeEvent]) -> None:
        with self._lock:
            for event in events:
                if event.name == RESET:
                    self._latest.clear()
                    self._known.clear()
                    self._resets += 1
                    continue
                known = self._known.get(event.name, 0)
                self._known[event.name] = max(known, event.version + event.deleted)
                cached = self._latest.get(event.name)
                if cached is not None and (event.deleted or cached.version != event.version):
                    del self._latest[event.name]

    def refresh(self, timeout: float = 0.0) -> list[ChangeEvent]:
        """Poll the watch once; its errors propagate (staleness grows, `last_error` says why)
        and the next poll resynchronises."""
        try:
            if self._watch is None:
                self._watch = self.store.watch()
                self._last_sync = time.monotonic()
            events = self._watch.poll(timeout)
        except Exception as e:
            self.last_error = e
            if self._watch is not None:
                self._watch.mark_stale()
            raise
        self.apply(events)
        self._last_sync = time.monotonic()
        self.last_error = None
        return events

    def start(self) -> ProfileCache:
        """Refresh in a daemon thread until close()."""
        if self._thread is None:
            self.refresh()
            self._thread = threading.Thread(target=self._run, name="mask-profile-watch",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh(self.poll_timeout)
            except Exception as e:  # noqa: BLE001 (the watch must outlive any bad record)
                if not isinstance(e, StoreUnavailable):
                    _log.warning("mask profile watch failed; retrying: %r", e)
                self._stop.wait(min(self.poll_timeout, 1.0))  # retry; get() fails closed

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 + self.poll_timeout)
        if self._watch is not None:
            self._watch.close()
