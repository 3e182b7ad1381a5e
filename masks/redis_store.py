"""Mask store on Redis, shared by the replicas of the service.

Keys under a namespace N (default "monet:masks"):
  N:seq                 store-wide change sequence (INCR)
  N:tokens              hash: seq -> the random token of that write (the last LOG_KEEP)
  N:names               sorted set: name scored by the seq of its last change (for resync)
  N:summaries           hash: name -> "<version> <ProfileSummary JSON>" of the latest (list)
  N:head:<name>         hash: version, seq, deleted (a tombstone after delete)
  N:versions:<name>     sorted set of the kept versions
  N:blob:<name>:<v>     MaskProfile.to_bytes of version v
  N:artifact:<name>     hash: digest, data of a named blob (not logged, not published)
  N:events              pub/sub channel: {"seq", "name", "version", "deleted", "token",
                        "prev"} per change (prev: the token at seq - 1)
Writes are Lua scripts (atomic): check the expected version, write the blob, bump the seq,
update head and indexes, log the token, trim old versions and publish, all or nothing. A value
that cannot be decoded fails its own profile only (ProfileCorrupt, or left out of list() and
reported by changes() as a delete). Blob keys are built
inside the scripts, so this targets a single Redis (or a cluster with one hash slot per N).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from masks.schema import MaskProfile, ProfileSummary, valid_name
from masks.store import (
    Artifact,
    ArtifactCorrupt,
    ArtifactNotFound,
    ChangeEvent,
    ChangeSet,
    ProfileCorrupt,
    ProfileNotFound,
    StoreUnavailable,
    VersionConflict,
    Watch,
    Written,
    check_artifact,
    digest_of,
)

__all__ = ["RedisMaskStore", "RedisWatch"]

LOG_KEEP = 10_000  # tokens kept: a watcher further behind resets (drops its cache)
_log = logging.getLogger("monet.masks")

# Shared by the write scripts: the next seq, its token logged, the token before it returned.
_LOG = """
local function log_change(seqkey, tokens, token)
  local seq = redis.call('INCR', seqkey)
  local prev = redis.call('HGET', tokens, seq - 1) or ''
  redis.call('HSET', tokens, seq, token)
  redis.call('HDEL', tokens, seq - %d)
  return seq, prev
end
""" % LOG_KEEP

_PUT = _LOG + """
local head, seqkey, names, summaries, versions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local tokens = KEYS[6]
local expected, blob, summary, name = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local prefix, keep, channel, token = ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8]
local h = redis.call('HMGET', head, 'version', 'deleted')
local cur = tonumber(h[1] or '0')
if not cur then return {'corrupt', 0} end
local live = cur
if h[2] == '1' then live = 0 end
if expected ~= '' and tonumber(expected) ~= live then return {'conflict', live} end
local new = cur + 1
local seq, prev = log_change(seqkey, tokens, token)
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
                                             deleted = false, token = token, prev = prev}))
return {'ok', new, seq, live}
"""

_DELETE = _LOG + """
local head, seqkey, names, summaries, versions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local tokens = KEYS[6]
local expected, name, prefix, channel, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local h = redis.call('HMGET', head, 'version', 'deleted')
local live = tonumber(h[1] or '0')
if not live then return {'corrupt', 0} end
if h[2] == '1' then live = 0 end
if live == 0 then return {'missing', 0} end
if expected ~= '' and tonumber(expected) ~= live then return {'conflict', live} end
local seq, prev = log_change(seqkey, tokens, token)
for _, v in ipairs(redis.call('ZRANGE', versions, 0, -1)) do redis.call('DEL', prefix .. v) end
redis.call('DEL', versions)
redis.call('HSET', head, 'seq', seq, 'deleted', '1')
redis.call('ZADD', names, seq, name)
redis.call('HDEL', summaries, name)
redis.call('PUBLISH', channel, cjson.encode({seq = seq, name = name, version = live,
                                             deleted = true, token = token, prev = prev}))
return {'ok', live, seq}
"""

_GET = """
local h = redis.call('HMGET', KEYS[1], 'version', 'deleted')
if not h[1] or h[2] == '1' then return false end
if not tonumber(h[1]) then return {-1, 'head version ' .. h[1]} end
local v = ARGV[2]
if v == '' then v = h[1] end
if tonumber(v) > tonumber(h[1]) then return false end
local blob = redis.call('GET', ARGV[1] .. v)
if not blob then return false end
return {tonumber(v), blob}
"""

_HEAD = """
local seq = redis.call('GET', KEYS[1]) or '0'
return {seq, redis.call('HGET', KEYS[2], seq) or ''}
"""

_CHANGES = """
local seq = redis.call('GET', KEYS[1]) or '0'
local since = ARGV[1]
local since_token = redis.call('HGET', KEYS[3], since) or false
if since == '0' then since_token = '' end
local out = {seq, redis.call('HGET', KEYS[3], seq) or '', since_token}
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. since, '+inf')) do
  local h = redis.pcall('HMGET', ARGV[2] .. name, 'version', 'seq', 'deleted')
  if h.err then h = {'', '', ''} end
  table.insert(out, name)
  table.insert(out, h[1] or '')
  table.insert(out, h[2] or '')
  table.insert(out, h[3] or '')
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
        head_timeout: float = 0.5,
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
        self._head = client.register_script(_HEAD)
        # head() is asked per request: no retries, and a short timeout, so that a Redis that
        # stops answering (a partition, a pause) costs a request at most head_timeout before
        # the cache's staleness bound decides, not the client's socket timeout.
        self._once = self._no_retry_client(timeout=head_timeout)

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
                f"{self.ns}:summaries", f"{self.ns}:versions:{name}", f"{self.ns}:tokens"]

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
        try:
            if int(v) < 0:
                raise ValueError(data.decode(errors="replace"))
            return MaskProfile.from_bytes(data).with_version(int(v))
        except Exception as e:  # any damage to the value: this profile fails, loudly
            raise ProfileCorrupt(name, version, e) from None

    def put(self, profile: MaskProfile, *, expected_version: int | None = None) -> MaskProfile:
        return self.write(profile, expected_version=expected_version).profile

    def write(self, profile: MaskProfile, *, expected_version: int | None = None) -> Written:
        summary = profile.summary().model_dump(mode="json")
        summary.pop("version")  # the script knows it; list() adds it back from the head
        args = ["" if expected_version is None else expected_version, profile.to_bytes(),
                json.dumps(summary), profile.name, self._blob_prefix(profile.name),
                self.keep_versions, self.channel, secrets.token_hex(8)]
        with self._io(f"writing '{profile.name}'"):
            status, version, *rest = self._put(keys=self._keys(profile.name), args=args)
        if status == b"conflict":
            raise VersionConflict(profile.name, expected_version, int(version))
        if status == b"corrupt":
            raise ProfileCorrupt(profile.name, None, "its head has no valid version")
        return Written(profile.with_version(int(version)), int(rest[1]))

    def delete(self, name: str, *, expected_version: int | None = None) -> int:
        if not valid_name(name):
            raise ProfileNotFound(name)
        args = ["" if expected_version is None else expected_version, name,
                self._blob_prefix(name), self.channel, secrets.token_hex(8)]
        with self._io(f"deleting '{name}'"):
            status, version, *_ = self._delete(keys=self._keys(name), args=args)
        if status == b"missing":
            raise ProfileNotFound(name)
        if status == b"corrupt":
            raise ProfileCorrupt(name, None, "its head has no valid version")
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
        for name, entry in sorted(summaries.items()):
            try:
                version, data = entry.split(b" ", 1)
                out.append(ProfileSummary.model_validate({**json.loads(data),
                                                          "version": int(version)}))
            except Exception as e:  # noqa: BLE001 (one bad entry must not hide the others)
                _log.warning("%s", ProfileCorrupt(name.decode(errors="replace"), None,
                                                  f"summary: {e}"))
        return out

    def current_seq(self) -> int:
        with self._io("reading the change sequence"):
            return int(self.client.get(f"{self.ns}:seq") or 0)

    def head(self) -> tuple[int, str]:
        with self._io("reading the head"):
            seq, token = self._head(keys=[f"{self.ns}:seq", f"{self.ns}:tokens"],
                                    client=self._once)
        return self._seq(seq), token.decode()

    def _seq(self, value: bytes) -> int:
        try:
            return int(value)
        except ValueError:
            raise StoreUnavailable(f"Redis mask store: {self.ns}:seq is corrupt: "
                                   f"{value[:40]!r}") from None

    def changes(self, since: int = 0) -> ChangeSet:
        with self._io("reading changes"):
            out = self._changes(keys=[f"{self.ns}:seq", f"{self.ns}:names", f"{self.ns}:tokens"],
                                args=[since, f"{self.ns}:head:"])
        seq = self._seq(out[0])
        token, since_token, rows = out[1].decode(), out[2], out[3:]
        events = [_head_event(rows[k : k + 4], seq) for k in range(0, len(rows), 4)]
        return ChangeSet(seq, sorted(events, key=lambda e: e.seq), token,
                         None if since_token is None else since_token.decode())

    def watch(self, since: int | None = None) -> RedisWatch:
        return RedisWatch(self, since=since, resync_interval=self.resync_interval)

    # ---- artifacts -------------------------------------------------------------------------
    def put_artifact(self, name: str, data: bytes) -> str:
        check_artifact(name, data)
        digest = digest_of(data)
        with self._io(f"writing artifact '{name}'"):  # one HSET: both fields or neither
            self.client.hset(f"{self.ns}:artifact:{name}",
                             mapping={"digest": digest, "data": bytes(data)})
        return digest

    def get_artifact(self, name: str) -> Artifact:
        check_artifact(name)
        with self._io(f"reading artifact '{name}'"):
            digest, data = self.client.hmget(f"{self.ns}:artifact:{name}", "digest", "data")
        if digest is None and data is None:
            raise ArtifactNotFound(name)
        if digest is None or data is None or digest_of(data) != digest.decode(errors="replace"):
            raise ArtifactCorrupt(name, "its bytes do not match their digest")
        return Artifact(name, data, digest.decode())

    def artifact_digest(self, name: str) -> str:
        check_artifact(name)
        with self._io(f"reading artifact '{name}'"):
            digest = self.client.hget(f"{self.ns}:artifact:{name}", "digest")
        if digest is None:
            raise ArtifactNotFound(name)
        return digest.decode(errors="replace")

    def delete_artifact(self, name: str) -> bool:
        check_artifact(name)
        with self._io(f"deleting artifact '{name}'"):
            return bool(self.client.delete(f"{self.ns}:artifact:{name}"))

    def ping(self) -> None:
        with self._io("ping"):
            self.client.ping()

    def close(self) -> None:
        self._once.close()
        self.client.close()

    def _no_retry_client(self, *, timeout: float | None = None) -> redis.Redis:
        """A client that never retries: for subscriptions (a reconnection must be known) and
        for head(), which a request waits on (the cache then applies its staleness bound);
        `timeout` replaces the socket and connect timeouts."""
        pool = self.client.connection_pool
        kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        if timeout is not None:
            kwargs |= {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        return redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **kwargs))


class RedisWatch(Watch):
    """Pub/sub notifications; on a dropped connection, resubscribe then resynchronise."""

    def __init__(self, store: RedisMaskStore, *, since: int | None, resync_interval: float):
        self._redis = store
        self._client = store._no_retry_client()
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
                    try:
                        notes.append(_event(message["data"]))
                    except (ValueError, TypeError, KeyError):  # garbled: ask the store
                        self._needs_resync = True
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
    return ChangeEvent(int(fields["seq"]), str(fields["name"]), int(fields["version"]),
                       bool(fields["deleted"]), str(fields["token"]), str(fields["prev"]))


def _head_event(row: list[bytes], seq: int) -> ChangeEvent:
    """[name, version, seq, deleted] of a head as a change event; a damaged head as a delete
    of its name at `seq`, so caches drop it and the next read reports it corrupt."""
    name = row[0].decode(errors="replace")
    try:
        return ChangeEvent(int(row[2]), name, int(row[1]), row[3] == b"1")
    except ValueError as e:
        _log.warning("%s", ProfileCorrupt(name, None, f"head: {e}"))
        return ChangeEvent(seq, name, 0, True)
