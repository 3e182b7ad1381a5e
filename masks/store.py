"""Mask profile stores: one interface (MaskStore), two implementations (local SQLite, Redis).

Every write bumps a store-wide change sequence and the profile's version (monotonic per name,
kept across deletes so (name, version) names one content within one store's life), and draws
a random token, so that a history is identified by (seq, token), not by seq alone: a store that
came back empty, or restored from an older copy and written to since, has other tokens at the
seqs a watcher knows. `put`/`delete` take an `expected_version` for compare-and-set (0: the
profile must not exist); `write` is `put` that also reports the version it replaced. A Watch
turns the store's notifications into ChangeEvents and resynchronises from `changes(since)`
whenever it may have missed some (a sequence gap, a token that does not follow its own, a
dropped connection, or no news for a while); a history other than its own yields RESET.
`head()` is (seq, token) alone, in one round trip: a cache asks it before every answer and
`catch_up`s when it is not where the cache is.
Store failures raise StoreUnavailable, never "not found", so that callers can fail closed; a
record that cannot be decoded raises ProfileCorrupt, naming the profile.

Artifacts are named binary blobs kept beside the profiles (an expert atlas, under the model's
identity): put replaces, get returns the bytes with their sha256 digest and checks it (a damaged
record raises ArtifactCorrupt), `artifact_digest` is the digest alone, so that a reader can tell
in one small round trip whether its loaded copy is current. At most MAX_ARTIFACT_BYTES each.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from masks.schema import MaskProfile, ProfileSummary

__all__ = [
    "MAX_ARTIFACT_BYTES",
    "MUST_NOT_EXIST",
    "RESET",
    "Artifact",
    "ArtifactCorrupt",
    "ArtifactNotFound",
    "AsyncMaskStore",
    "ChangeEvent",
    "ChangeSet",
    "MaskStore",
    "ProfileCorrupt",
    "ProfileNotFound",
    "StoreError",
    "StoreUnavailable",
    "VersionConflict",
    "Watch",
    "Written",
    "catch_up",
    "check_artifact",
    "digest_of",
    "open_store",
]

MUST_NOT_EXIST = 0  # expected_version for "create, do not overwrite"
RESET = "*"  # ChangeEvent.name when the store lost its history: drop every cached profile
MAX_ARTIFACT_BYTES = 256 << 20  # below Redis's 512 MiB value limit, with room to spare
_ARTIFACT_NAME = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,127}$")


class StoreError(Exception):
    """Base of the store errors."""


class ProfileNotFound(StoreError, LookupError):
    def __init__(self, name: str, version: int | None = None):
        what = f"'{name}'" if version is None else f"'{name}' version {version}"
        super().__init__(f"mask profile {what} not found")
        self.name, self.version = name, version


class VersionConflict(StoreError):
    """A compare-and-set write whose expected version is not the stored one."""

    def __init__(self, name: str, expected: int, actual: int):
        state = "does not exist" if actual == 0 else f"is at version {actual}"
        want = "not to exist" if expected == 0 else f"version {expected}"
        super().__init__(f"mask profile '{name}' {state}, the write expected {want}")
        self.name, self.expected, self.actual = name, expected, actual


class StoreUnavailable(StoreError):
    """The store cannot be reached or failed: callers must not treat this as 'no profile'."""


class ProfileCorrupt(StoreError):
    """One profile's record cannot be decoded: that profile fails, the others do not."""

    def __init__(self, name: str, version: int | None, error: BaseException | str):
        what = f"'{name}'" if version is None else f"'{name}' version {version}"
        super().__init__(f"mask profile {what} is corrupt in the store: {error}")
        self.name, self.version = name, version


class ArtifactNotFound(StoreError, LookupError):
    def __init__(self, name: str):
        super().__init__(f"artifact '{name}' not found")
        self.name = name


class ArtifactCorrupt(StoreError):
    """An artifact whose bytes do not match their digest (or cannot be decoded by its reader)."""

    def __init__(self, name: str, error: BaseException | str):
        super().__init__(f"artifact '{name}' is corrupt in the store: {error}")
        self.name = name


@dataclass(frozen=True, slots=True)
class Artifact:
    name: str
    data: bytes
    digest: str  # "sha256:<hex>" of data


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def check_artifact(name: str, data: bytes | None = None) -> None:
    """ValueError for a name outside [a-z0-9._:-] (128 at most) or data over the bound."""
    if not isinstance(name, str) or not _ARTIFACT_NAME.match(name):
        raise ValueError(f"artifact name {name[:80]!r}: use 1 to 128 of a-z 0-9 . _ : -")
    if data is not None and len(data) > MAX_ARTIFACT_BYTES:
        raise ValueError(f"artifact '{name}': {len(data)} bytes, the store keeps at most "
                         f"{MAX_ARTIFACT_BYTES}")


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """A profile's state after change number `seq`: its latest version, or deleted."""

    seq: int
    name: str
    version: int
    deleted: bool = False
    token: str = ""  # notifications: the write's token, and the token of the write before it
    prev: str = ""


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """The store's sequence number and the latest state of every name changed since; `token`
    is the token of the write at `seq`, `since_token` the token at `since` in this store's
    history ("" for 0, None when the store has no such write: it is not the history the
    caller followed)."""

    seq: int
    events: list[ChangeEvent] = field(default_factory=list)
    token: str = ""
    since_token: str | None = ""


@dataclass(frozen=True, slots=True)
class Written:
    """What a write did: the stored copy and the live version it replaced (0: none)."""

    profile: MaskProfile
    previous_version: int


@runtime_checkable
class MaskStore(Protocol):
    def get(self, name: str, version: int | None = None) -> MaskProfile:
        """The latest (or the given, if still kept) version; ProfileNotFound otherwise."""
        ...

    def put(self, profile: MaskProfile, *, expected_version: int | None = None) -> MaskProfile:
        """Store as the next version; returns the stored copy. VersionConflict when
        expected_version is given and differs (0: must not exist)."""
        ...

    def write(self, profile: MaskProfile, *, expected_version: int | None = None) -> Written:
        """`put`, also reporting the live version this write replaced (0: none)."""
        ...

    def delete(self, name: str, *, expected_version: int | None = None) -> int:
        """Delete every kept version; returns the deleted version."""
        ...

    def list(self) -> list[ProfileSummary]:
        """Summaries of the live profiles; one that cannot be decoded is logged, left out."""
        ...

    def versions(self, name: str) -> list[int]:
        """Kept versions of a profile, ascending (empty when absent)."""
        ...

    def current_seq(self) -> int: ...

    def head(self) -> tuple[int, str]:
        """(seq, token) of the latest write, (0, "") when empty: one round trip, asked before
        every masked request to tell whether a cache is still current."""
        ...

    def changes(self, since: int = 0) -> ChangeSet: ...

    def watch(self, since: int | None = None) -> Watch:
        """Notifications of changes after `since` (default: from now)."""
        ...

    def put_artifact(self, name: str, data: bytes) -> str:
        """Store (replace) a named blob; returns its digest. ValueError: bad name, too large."""
        ...

    def get_artifact(self, name: str) -> Artifact:
        """ArtifactNotFound when absent, ArtifactCorrupt when its bytes fail their digest."""
        ...

    def artifact_digest(self, name: str) -> str:
        """The stored digest alone (ArtifactNotFound when absent): one small round trip."""
        ...

    def delete_artifact(self, name: str) -> bool:
        """Whether there was one."""
        ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class Watch:
    """Change events with resynchronisation; subclasses implement `_receive`.

    poll(timeout) returns the events after `last_seq` in order (possibly none). Notifications
    are taken as hints: one that does not extend the history followed so far (a gap in seq, a
    `prev` token other than `last_token`, an old seq with an unknown token), a reconnection or
    `resync_interval` seconds without news triggers `changes(last_seq)`, which is
    authoritative; when the store's token at `last_seq` is not `last_token` the store is not the
    one followed (emptied, restored, replaced) and RESET comes first. Events are states, so a
    duplicate is harmless: compare versions.
    """

    def __init__(self, store: MaskStore, *, since: int | None, resync_interval: float):
        self._store = store
        self.resync_interval = resync_interval
        self.last_seq = store.current_seq() if since is None else since
        # The token at last_seq; None: `since` is not in this store's history (trusted then).
        self.last_token: str | None = store.changes(self.last_seq).since_token
        self._seen: dict[int, str] = {}  # recent seq -> token heard (duplicates are no news)
        self._needs_resync = True
        self._last_check = time.monotonic()
        self.resyncs = 0  # how often changes() had to fill in (for tests and metrics)

    def _receive(self, timeout: float) -> list[ChangeEvent]:
        """Notifications within `timeout` seconds; set _needs_resync when some may be lost."""
        raise NotImplementedError

    def mark_stale(self) -> None:
        """Resynchronise at the next poll (after a failure the caller cannot place)."""
        self._needs_resync = True

    def poll(self, timeout: float = 1.0) -> list[ChangeEvent]:
        events: list[ChangeEvent] = []
        if self._needs_resync:
            events += self._resync()
            if events:
                return events
        notes = self._receive(timeout)
        for note in sorted(notes, key=lambda e: e.seq):
            if note.seq <= self.last_seq and self._seen.get(note.seq) == note.token:
                continue  # heard already
            if note.seq != self.last_seq + 1 or note.prev != self.last_token:
                self._needs_resync = True  # missed some, or another history: ask the store
                break
            events.append(note)
            self._follow(note.seq, note.token)
            self._last_check = time.monotonic()
        if self._needs_resync or (
            not notes and time.monotonic() - self._last_check >= self.resync_interval
        ):
            events += self._resync()
        return events

    def _follow(self, seq: int, token: str) -> None:
        self.last_seq, self.last_token = seq, token
        self._seen[seq] = token
        while len(self._seen) > 1024:
            del self._seen[next(iter(self._seen))]

    def _resync(self) -> list[ChangeEvent]:
        events, changes = catch_up(self._store, self.last_seq, self.last_token)
        self._last_check = time.monotonic()
        self._needs_resync = False
        if events and events[0].name == RESET:
            self._seen.clear()
        if events or changes.seq != self.last_seq:
            self.resyncs += 1
        self._follow(changes.seq, changes.token)
        return events

    def __iter__(self) -> Iterator[ChangeEvent]:
        while True:
            yield from self.poll(1.0)

    def close(self) -> None:
        pass

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def catch_up(store: MaskStore, seq: int,
             token: str | None) -> tuple[list[ChangeEvent], ChangeSet]:
    """The events that take a follower at (seq, token) to the store's head, and the ChangeSet
    read (its seq and token: the new position). When the store's token at `seq` is not `token`
    (None: trusted), the store is not the history followed: RESET, then every live profile."""
    changes = store.changes(seq)
    if changes.seq < seq or (token is not None and changes.since_token != token):
        changes = store.changes(0)
        return [ChangeEvent(changes.seq, RESET, 0, True), *changes.events], changes
    return [e for e in changes.events if e.seq > seq], changes


class PollingWatch(Watch):
    """For stores without push notifications: ask `changes()` every `poll_interval`."""

    def __init__(self, store: MaskStore, *, since: int | None, poll_interval: float = 0.2):
        super().__init__(store, since=since, resync_interval=poll_interval)
        self.poll_interval = poll_interval

    def poll(self, timeout: float = 1.0) -> list[ChangeEvent]:
        deadline = time.monotonic() + timeout
        while True:
            events = self._resync()
            left = deadline - time.monotonic()
            if events or left <= 0:
                return events
            time.sleep(min(self.poll_interval, left))


class AsyncMaskStore:
    """An asyncio facade over any MaskStore: each call runs in a worker thread."""

    def __init__(self, store: MaskStore):
        self.store = store

    async def get(self, name: str, version: int | None = None) -> MaskProfile:
        return await asyncio.to_thread(self.store.get, name, version)

    async def put(self, profile: MaskProfile, *, expected_version: int | None = None):
        return await asyncio.to_thread(self.store.put, profile, expected_version=expected_version)

    async def write(self, profile: MaskProfile, *, expected_version: int | None = None):
        return await asyncio.to_thread(self.store.write, profile,
                                       expected_version=expected_version)

    async def delete(self, name: str, *, expected_version: int | None = None) -> int:
        return await asyncio.to_thread(self.store.delete, name, expected_version=expected_version)

    async def list(self) -> list[ProfileSummary]:
        return await asyncio.to_thread(self.store.list)

    async def changes(self, since: int = 0) -> ChangeSet:
        return await asyncio.to_thread(self.store.changes, since)

    async def ping(self) -> None:
        await asyncio.to_thread(self.store.ping)

    async def watch(
        self, since: int | None = None, *, poll_timeout: float = 1.0
    ) -> AsyncIterator[ChangeEvent]:
        """Yields change events forever; StoreUnavailable ends it (call again to resume from
        the last seq seen, which resynchronises)."""
        watch = await asyncio.to_thread(self.store.watch, since)
        try:
            while True:
                for event in await asyncio.to_thread(watch.poll, poll_timeout):
                    yield event
        finally:
            watch.close()


def open_store(
    url: str | Path | None = None,
    *,
    namespace: str = "monet:masks",
    default_dir: str | Path | None = None,
    **options,
) -> MaskStore:
    """A store from a URL: redis://, rediss:// or unix:// for Redis; a directory or
    file://directory for the local store (its SQLite database lies inside); None for the local
    store in `default_dir`."""
    text = str(url) if url is not None else ""
    if text.startswith(("redis://", "rediss://", "unix://")):
        from masks.redis_store import RedisMaskStore

        return RedisMaskStore.from_url(text, namespace=namespace, **options)
    from masks.local_store import LocalMaskStore

    if text.startswith("file://"):
        text = text.removeprefix("file://")
    path = text or default_dir
    if not path:
        raise ValueError("no mask store configured: give a Redis URL or a directory")
    return LocalMaskStore(path, **options)
