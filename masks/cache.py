"""An in-memory cache of mask profiles for one model, current before every answer.

A replica asks `get(name)` per request. Each get first asks the store for its head (seq, token)
in one round trip: when it is the position the cache is current to, a hit is a dict lookup;
otherwise the cache catches up (`catch_up`: the changed names, or RESET when the store was
emptied, restored or replaced, which drops everything) before answering, one catch-up shared by
concurrent callers. A watch thread (`start()`) applies the store's notifications ahead of that,
and reports its health (`last_error`, for /ready); correctness does not wait on it. Events only
ever drop entries (every entry an event names, whatever its version: a store that lost its data
reuses versions), and a read that straddled a change is not kept. The watch and the catch-ups
each follow the store from a position of their own, and what they read moves the cache's
position only from the position it was read from: another history (the store emptied and
written again) can reach the same position's sequence number while entries of the old one are
still cached. Failing closed: when the store cannot be reached, cached profiles serve until
`max_staleness` seconds after the store was last reached, then `get` raises StoreUnavailable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from masks.schema import MaskProfile, check_model
from masks.store import RESET, ChangeEvent, MaskStore, StoreUnavailable, Watch, catch_up

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
        self._at: tuple[int, str | None] | None = None  # the store position the cache is current to
        self._lock = threading.Lock()  # the entries, _known, _resets and _at change together
        self._sync_lock = threading.Lock()  # one catch-up at a time
        self._watch: Watch | None = None
        self._last_sync = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error: Exception | None = None

    # ---- reading -------------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> MaskProfile:
        """The latest (or a given) version; ProfileNotFound, StoreUnavailable, ModelMismatch."""
        self.sync()
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
                if (resets == self._resets and self._at is not None
                        and profile.version >= self._known.get(name, 0)):
                    self._latest[name] = profile
                    while len(self._latest) > self.max_entries:
                        self._latest.popitem(last=False)
        return profile

    def sync(self) -> None:
        """Make the cache current to the store's head now: one round trip when it is; a
        catch-up (shared by concurrent callers) when the store moved or is another history;
        the staleness bound when the store cannot be reached."""
        try:
            head = self.store.head()
        except StoreUnavailable:
            age = time.monotonic() - self._last_sync
            if age > self.max_staleness:
                raise StoreUnavailable(f"mask store not reached for {age:.0f} s "
                                       f"({self.last_error}); refusing possibly stale profiles"
                                       ) from None
            return  # cached profiles serve within the bound; misses fail at the store
        if head != self._at:
            with self._sync_lock:
                if head != self._at:  # not caught up by the caller before us
                    self._catch_up(head)
        self._last_sync = time.monotonic()

    def _catch_up(self, head: tuple[int, str]) -> None:
        at = self._at
        if at is None:  # never synced: start empty at the head (nothing cached can be stale)
            events, position = [ChangeEvent(head[0], RESET, 0, True)], head
        else:
            events, changes = catch_up(self.store, *at)
            position = (changes.seq, changes.token)
        if not self.apply(events, position=position, start=at):
            # The watch moved the cache meanwhile, perhaps along another history: empty is
            # current to any position.
            self.apply([ChangeEvent(position[0], RESET, 0, True)], position=position)

    # ---- keeping current -----------------------------------------------------------------
    def apply(self, events: list[ChangeEvent], *,
              position: tuple[int, str | None] | None = None,
              start: tuple[int, str | None] | None = None) -> bool:
        """Drop what the events name; `position`: the store position they bring the cache to
        (every change up to it applied), which requests compare the store's head with, taken
        only when the cache is at `start`, the position the events were read from (None: any).
        Returns whether it was."""
        with self._lock:
            for event in events:
                if event.name == RESET:
                    self._latest.clear()
                    self._known.clear()
                    self._resets += 1
                    continue
                known = self._known.get(event.name, 0)
                self._known[event.name] = max(known, event.version + event.deleted)
                self._latest.pop(event.name, None)
            follows = start is None or self._at == start
            if position is not None and follows:
                self._at = position
            return follows

    def refresh(self, timeout: float = 0.0) -> list[ChangeEvent]:
        """Poll the watch once; its errors propagate (`last_error` says why) and the next poll
        resynchronises."""
        try:
            if self._watch is None:
                watch = self.store.watch()
                # Start empty where the watch starts, so its positions hold for the cache too.
                self.apply([ChangeEvent(watch.last_seq, RESET, 0, True)],
                           position=(watch.last_seq, watch.last_token))
                self._watch = watch
            start = (self._watch.last_seq, self._watch.last_token)
            events = self._watch.poll(timeout)
        except Exception as e:
            self.last_error = e
            if self._watch is not None:
                self._watch.mark_stale()
            raise
        if events:
            self.apply(events, position=(self._watch.last_seq, self._watch.last_token),
                       start=start)
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
