"""Mask store on Redis, shared by the replicas of the service.

Keys under a namespace N (default "monet:masks"):
  N:seq                 store-wide change sequence (INCR)
  N:names               sorted set: name scored by the seq of its last change (for resync)
  N:summaries           hash: name -> "<version> <ProfileSummary JSON>" of the latest (list)
  N:head:<name>         hash: version, seq, deleted (a tombstone after delete)
  N:versions:<name>     sorted set of the kept versions
  N:blob:<name>:<v>     MaskProfile.to_bytes of version v
  N:events              pub/sub channel: {"seq", "name", "version", "deleted"} per change
Writes are Lua scripts (atomic): check the expected version, write the blob, bump the seq,
update head and indexes, trim old versions and publish, all or nothing. Blob keys are built
inside the scripts, so this targets a single Redis (or a cluster with one hash slot per N).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from masks.schema import MaskProfile, ProfileSummary, valid_name
from masks.store import (
    ChangeEvent,
    ChangeSet,
    ProfileNotFound,
    StoreUnavailable,
    VersionConflict,
    Watch,
)

__all__ = ["RedisMaskStore", "RedisWatch"]

_PUT = """
local head, seqkey, names, summaries, versions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local expected, blob, summary, name = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local prefix, keep, channel = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local h = redis.call('HMGET', head, 'version', 'deleted')
local cur = tonumber(h[1] or '0')
local live = cur
if h[2] == '1' then live = 0 end
if expected ~= '' and tonumber(expected) ~= live then return {'conflict', live} end
local new = cur + 1
local seq = redis.call('INCR', seqkey)
redis.call('SET', prefix .. new, blob)
redis.call('HSET', head, 'version', new, 'seq', seq, 'deleted', '0')
redis.call('ZADD', versions, new, new)
redis.call('ZADD', names, seq, name)
redis.call('HSET', summaries, name, new .. ' ' .. summary)
local old = redis.call('ZRANGE', versions, 0, -(keep + 1))
for _, v in ipairs(old) do
  redis.call('DEL', prefix .. v)
  redis.call('ZREM', versions, v)
end
redis.call('PUBLISH', channel, cjson.encode({seq = seq, name = name, version = new,
                                             deleted = false}))
return {'ok', new, seq}
"""

_DELETE = """
local head, seqkey, names, summaries, versions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local expected, name, prefix, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local h = redis.call('HMGET', head, 'version', 'deleted')
local live = tonumber(h[1] or '0')
if h[2] == '1' then live = 0 end
if live == 0 then return {'missing', 0} end
if expected ~= '' and tonumber(expected) ~= live then return {'conflict', live} end
local seq = redis.call('INCR', seqkey)
for _, v in ipairs(redis.call('ZRANGE', versions, 0, -1)) do redis.call('DEL', prefix .. v) end
redis.call('DEL', versions)
redis.call('HSET', head, 'seq', seq, 'deleted', '1')
redis.call('ZADD', names, seq, name)
redis.call('HDEL', summaries, name)
redis.call('PUBLISH', channel, cjson.encode({seq = seq, name = name, version = live,
                                             deleted = true}))
return {'ok', live, seq}
"""

_GET = """
local h = redis.call('HMGET', KEYS[1], 'version', 'deleted')
if not h[1] or h[2] == '1' then return false end
local v = ARGV[2]
if v == '' then v = h[1] end
if tonumber(v) > tonumber(h[1]) then return false end
local blob = redis.call('GET', ARGV[1] .. v)
if not blob then return false end
return {tonumber(v), blob}
"""

_CHANGES = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {seq}
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
  local h = redis.call('HMGET', ARGV[2] .. name, 'version', 'seq', 'deleted')
  table.insert(out, name)
  table.insert(out, tonumber(h[1]))
  table.insert(out, tonumber(h[2]))
  table.insert(out, h[3])
end
return out
"""


class RedisMaskStore:
    """MaskStore on Redis: compare-and-set by Lua script, notifications by pub/sub."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "monet:masks",
        keep_versions: int = 16,
        resync_interval: float = 5.0,
    ):
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.client = client
        self.ns = namespace
        self.keep_versions = keep_versions
        self.resync_interval = resync_interval
        self.channel = f"{namespace}:events"
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._get = client.register_script(_GET)
        self._changes = client.register_script(_CHANGES)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        retries: int = 2,
        **options: Any,
    ) -> RedisMaskStore:
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        )
        return cls(client, **options)

    def __repr__(self) -> str:
        return f"RedisMaskStore({self.client.connection_pool!r}, namespace={self.ns!r})"

    # ---- keys ----------------------------------------------------------------------------
    def _keys(self, name: str) -> list[str]:
        return [f"{self.ns}:head:{name}", f"{self.ns}:seq", f"{self.ns}:names",
                f"{self.ns}:summaries", f"{self.ns}:versions:{name}"]

    def _blob_prefix(self, name: str) -> str:
        return f"{self.ns}:blob:{name}:"

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as e:
            raise StoreUnavailable(f"Redis mask store: {what}: {e}") from e
        except OSError as e:
            raise StoreUnavailable(f"Redis mask store: {what}: {e}") from e

    # ---- MaskStore -----------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> MaskProfile:
        if not valid_name(name):
            raise ProfileNotFound(name, version)
        with self._io(f"reading '{name}'"):
            found = self._get(keys=[f"{self.ns}:head:{name}"],
                              args=[self._blob_prefix(name), "" if version is None else version])
        if not found:
            raise ProfileNotFound(name, version)
        v, data = found
        return MaskProfile.from_bytes(data).with_version(int(v))

    def put(self, profile: MaskProfile, *, expected_version: int | None = None) -> MaskProfile:
        summary = profile.summary().model_dump(mode="json")
        summary.pop("version")  # the script knows it; list() adds it back from the head
        args = ["" if expected_version is None else expected_version, profile.to_bytes(),
                json.dumps(summary), profile.name, self._blob_prefix(profile.name),
                self.keep_versions, self.channel]
        with self._io(f"writing '{profile.name}'"):
            status, version, *_ = self._put(keys=self._keys(profile.name), args=args)
        if status == b"conflict":
            raise VersionConflict(profile.name, expected_version, int(version))
        return profile.with_version(int(version))

    def delete(self, name: str, *, expected_version: int | None = None) -> int:
        if not valid_name(name):
            raise ProfileNotFound(name)
        args = ["" if expected_version is None else expected_version, name,
                self._blob_prefix(name), self.channel]
        with self._io(f"deleting '{name}'"):
            status, version, *_ = self._delete(keys=self._keys(name), args=args)
        if status == b"missing":
            raise ProfileNotFound(name)
        if status == b"conflict":
            raise VersionConflict(name, expected_version, int(version))
        return int(version)

    def versions(self, name: str) -> list[int]:
        with self._io(f"listing versions of '{name}'"):
            return sorted(int(v) for v in self.client.zrange(f"{self.ns}:versions:{name}", 0, -1))

    def list(self) -> list[ProfileSummary]:
        with self._io("listing"):
            summaries = self.client.hgetall(f"{self.ns}:summaries")
        out = []
        for _, entry in sorted(summaries.items()):
            version, data = entry.split(b" ", 1)
            out.append(ProfileSummary.model_validate({**json.loads(data), "version": int(version)}))
        return out

    def current_seq(self) -> int:
        with self._io("reading the change sequence"):
            return int(self.client.get(f"{self.ns}:seq") or 0)

    def changes(self, since: int = 0) -> ChangeSet:
        with self._io("reading changes"):
            out = self._changes(keys=[f"{self.ns}:seq", f"{self.ns}:names"],
                                args=[since, f"{self.ns}:head:"])
        seq, rows = int(out[0]), out[1:]
        events = [
            ChangeEvent(int(rows[k + 2]), rows[k].decode(), int(rows[k + 1]), rows[k + 3] == b"1")
            for k in range(0, len(rows), 4)
        ]
        return ChangeSet(seq, sorted(events, key=lambda e: e.seq))

    def watch(self, since: int | None = None) -> RedisWatch:
        return RedisWatch(self, since=since, resync_interval=self.resync_interval)

    def ping(self) -> None:
        with self._io("ping"):
            self.client.ping()

    def close(self) -> None:
        self.client.close()

    def _pubsub_client(self) -> redis.Redis:
        """A client for subscriptions that never reconnects silently (we must know)."""
        pool = self.client.connection_pool
        kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        return redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **kwargs))


class RedisWatch(Watch):
    """Pub/sub notifications; on a dropped connection, resubscribe then resynchronise."""

    def __init__(self, store: RedisMaskStore, *, since: int | None, resync_interval: float):
        self._redis = store
        self._client = store._pubsub_client()
        self._pubsub: redis.client.PubSub | None = None
        self.reconnects = 0
        self._subscribe()  # before reading the baseline seq: nothing falls in between
        super().__init__(store, since=since, resync_interval=resync_interval)

    def _subscribe(self) -> None:
        self._drop()
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._redis.channel)
        except (redis.RedisError, OSError) as e:
            pubsub.close()
            raise StoreUnavailable(f"Redis mask store: subscribing: {e}") from e
        self._pubsub = pubsub

    def _drop(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except (redis.RedisError, OSError):
                pass
            self._pubsub = None

    def _receive(self, timeout: float) -> list[ChangeEvent]:
        if self._pubsub is None:  # a previous reconnection failed: try again
            self._subscribe()
            self._needs_resync = True
            return []
        notes: list[ChangeEvent] = []
        try:
            message = self._pubsub.get_message(timeout=timeout)
            while message is not None and len(notes) < 1000:
                if message["type"] == "message":
                    notes.append(_event(message["data"]))
                message = self._pubsub.get_message(timeout=0)
        except (redis.RedisError, OSError):
            self.reconnects += 1
            self._needs_resync = True
            self._subscribe()  # raises StoreUnavailable while Redis stays away
        return notes

    def close(self) -> None:
        self._drop()
        self._client.close()


def _event(data: bytes) -> ChangeEvent:
    fields = json.loads(data)
    return ChangeEvent(int(fields["seq"]), fields["name"], int(fields["version"]),
                       bool(fields["deleted"]))
