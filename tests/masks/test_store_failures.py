"""Failures: dropped subscriptions resynchronise, an unreachable store fails closed, several
processes share the local directory without losing updates."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from masks.local_store import LocalMaskStore
from masks.redis_store import RedisMaskStore
from masks.store import RESET, ProfileNotFound, StoreUnavailable
from watch_support import wait_for

REPO = Path(__file__).resolve().parents[2]


def test_dropped_subscription_resynchronises(redis_server, namespace, make_profile):
    writer = RedisMaskStore.from_url(redis_server.url, namespace=namespace)
    reader = RedisMaskStore.from_url(redis_server.url, namespace=namespace)
    admin = redis.Redis.from_url(redis_server.url)
    watch = reader.watch()
    try:
        writer.put(make_profile("a"))
        wait_for(watch, lambda seen: any(e.name == "a" for e in seen))
        # Drop the subscriber's connection, then change things while nobody listens:
        # pub/sub delivers those notifications to no one.
        assert admin.client_kill_filter(_type="pubsub") >= 1
        writer.put(make_profile("b"))
        writer.put(make_profile("a", seed=1))
        writer.delete("b")
        events = wait_for(watch, lambda seen: {e.name for e in seen} >= {"a", "b"})
        state = {e.name: (e.version, e.deleted) for e in events}
        assert state == {"a": (2, False), "b": (1, True)}
        assert watch.reconnects >= 1 and watch.resyncs >= 1
        # And notifications flow again on the new subscription.
        writer.put(make_profile("c"))
        assert wait_for(watch, lambda seen: any(e.name == "c" for e in seen))[-1].version == 1
    finally:
        watch.close()
        for c in (writer, reader, admin):
            c.close()


def test_lost_notification_is_found_by_periodic_resync(redis_server, namespace, make_profile):
    """A notification can be lost without the connection dropping: the watch compares the
    change sequence when it has heard nothing for resync_interval."""
    reader = RedisMaskStore.from_url(redis_server.url, namespace=namespace, resync_interval=0.2)
    # A writer publishing on another channel: the change happens, the notification is lost.
    muted = RedisMaskStore.from_url(redis_server.url, namespace=namespace)
    muted.channel = f"{namespace}:nobody-listens"
    with reader.watch() as watch:
        muted.put(make_profile("p"))
        events = wait_for(watch, lambda seen: any(e.name == "p" for e in seen))
        assert events[0].version == 1 and watch.resyncs >= 1
    reader.close()
    muted.close()


def test_sequence_gap_triggers_resync(redis_server, namespace, make_profile):
    reader = RedisMaskStore.from_url(redis_server.url, namespace=namespace)
    writer = RedisMaskStore.from_url(redis_server.url, namespace=namespace)
    muted = RedisMaskStore.from_url(redis_server.url, namespace=namespace)
    muted.channel = f"{namespace}:nobody-listens"
    with reader.watch() as watch:
        muted.put(make_profile("lost"))  # seq 1, notification lost
        writer.put(make_profile("heard"))  # seq 2 arrives: the gap says seq 1 is missing
        events = wait_for(watch, lambda seen: {e.name for e in seen} >= {"lost", "heard"},
                            timeout=2.0)
        assert [e.seq for e in events] == [1, 2]
    for c in (reader, writer, muted):
        c.close()


def test_unreachable_redis_fails_closed(make_profile):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = RedisMaskStore.from_url(f"redis://127.0.0.1:{port}/0", connect_timeout=0.2,
                                    retries=0)
    for call in (lambda: store.get("p"), lambda: store.list(), lambda: store.current_seq(),
                 lambda: store.put(make_profile("p")), lambda: store.delete("p"),
                 lambda: store.changes(0), store.ping, lambda: store.watch()):
        with pytest.raises(StoreUnavailable):
            call()


def test_redis_restart_without_data_resets_watchers(private_redis, namespace, make_profile):
    store = RedisMaskStore.from_url(private_redis.url, namespace=namespace, connect_timeout=0.2,
                                    retries=0)
    store.put(make_profile("a"))
    store.put(make_profile("a", seed=1))
    watch = store.watch()
    private_redis.stop()
    with pytest.raises(StoreUnavailable):
        store.get("a")  # not ProfileNotFound: the caller must fail closed
    with pytest.raises(StoreUnavailable):
        for _ in range(20):
            watch.poll(0.05)
    private_redis.start()  # same port, empty: the change sequence went backwards
    store.put(make_profile("b"))
    events = wait_for(watch, lambda seen: any(e.name == "b" for e in seen))
    assert events[0].name == RESET
    assert ("b", 1) in [(e.name, e.version) for e in events]
    with pytest.raises(ProfileNotFound):
        store.get("a")
    watch.close()
    store.close()


def test_local_store_unusable_directory_fails_closed(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable):
        LocalMaskStore(blocker / "store")


WRITER = textwrap.dedent("""
    import sys
    from masks.local_store import LocalMaskStore
    from masks.store import VersionConflict
    store, n = LocalMaskStore(sys.argv[1]), int(sys.argv[2])
    conflicts = 0
    for _ in range(n):
        while True:
            current = store.get("counter")
            bumped = current.model_copy(
                update={"description": str(int(current.description) + 1)})
            try:
                store.put(bumped, expected_version=current.version)
                break
            except VersionConflict:
                conflicts += 1
    print(conflicts)
""")


def test_local_store_two_processes_lose_no_update(tmp_path, make_profile):
    root = tmp_path / "shared"
    LocalMaskStore(root).put(make_profile("counter", description="0"))
    n = 15
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(n)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    final = LocalMaskStore(root).get("counter")
    assert final.description == str(2 * n) and final.version == 2 * n + 1
