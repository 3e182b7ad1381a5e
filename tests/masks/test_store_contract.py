"""One contract for every MaskStore: the local directory store and Redis (a real server)."""

from __future__ import annotations

import asyncio
import shutil
import threading

import numpy as np
import pytest
import redis

from masks.local_store import LocalMaskStore
from masks.redis_store import RedisMaskStore
from masks.store import (
    MUST_NOT_EXIST,
    RESET,
    AsyncMaskStore,
    MaskStore,
    ProfileNotFound,
    VersionConflict,
    open_store,
)
from watch_support import wait_for


@pytest.fixture(params=["local", "redis"])
def connect(request, tmp_path, namespace):
    """connect(**options) -> a new client of one shared store (call twice for two replicas)."""
    opened: list[MaskStore] = []

    def wipe() -> None:
        """Lose every record, as a wiped directory or a Redis restarted without its data."""
        if request.param == "local":
            shutil.rmtree(tmp_path / "store")
        else:
            client = redis.Redis.from_url(request.getfixturevalue("redis_server").url)
            for key in client.scan_iter(f"{namespace}:*"):
                client.delete(key)
            client.close()

    def make(**options) -> MaskStore:
        if request.param == "local":
            store = LocalMaskStore(tmp_path / "store", poll_interval=0.02, **options)
        else:
            server = request.getfixturevalue("redis_server")
            store = RedisMaskStore.from_url(server.url, namespace=namespace, **options)
        opened.append(store)
        return store

    make.wipe = wipe
    yield make
    for store in opened:
        store.close()


def test_is_a_mask_store(connect):
    assert isinstance(connect(), MaskStore)


def test_put_get_versions(connect, make_profile):
    store = connect()
    with pytest.raises(ProfileNotFound):
        store.get("p")
    first = store.put(make_profile("p", seed=1))
    assert first.version == 1
    second = store.put(make_profile("p", seed=2, description="two"))
    assert second.version == 2
    got = store.get("p")
    assert got == second and got.description == "two"
    assert store.get("p", 1) == first
    assert store.get("p", 1).experts == make_profile("p", seed=1).experts
    assert store.versions("p") == [1, 2]
    with pytest.raises(ProfileNotFound):
        store.get("p", 3)
    with pytest.raises(ProfileNotFound):
        store.get("Not A Name")


def test_old_versions_are_trimmed(connect, make_profile):
    store = connect(keep_versions=2)
    for seed in range(4):
        store.put(make_profile("p", seed=seed))
    assert store.versions("p") == [3, 4]
    with pytest.raises(ProfileNotFound):
        store.get("p", 2)
    assert store.get("p", 3).experts == make_profile("p", seed=2).experts


def test_compare_and_set(connect, make_profile):
    store = connect()
    assert store.put(make_profile("p"), expected_version=MUST_NOT_EXIST).version == 1
    with pytest.raises(VersionConflict) as err:
        store.put(make_profile("p"), expected_version=MUST_NOT_EXIST)
    assert (err.value.expected, err.value.actual) == (0, 1)
    assert store.put(make_profile("p", seed=5), expected_version=1).version == 2
    with pytest.raises(VersionConflict):
        store.put(make_profile("q"), expected_version=1)


def test_two_writers_the_loser_gets_a_conflict(connect, make_profile):
    a, b = connect(), connect()
    a.put(make_profile("p", description="base"))
    seen_a, seen_b = a.get("p"), b.get("p")
    assert seen_a.version == seen_b.version == 1
    a.put(seen_a.model_copy(update={"description": "from a"}), expected_version=seen_a.version)
    with pytest.raises(VersionConflict) as err:
        b.put(seen_b.model_copy(update={"description": "from b"}),
              expected_version=seen_b.version)
    assert (err.value.expected, err.value.actual) == (1, 2)
    assert b.get("p").description == "from a"


def test_concurrent_writers_lose_no_update(connect, make_profile):
    """Two replicas increment a counter by read-modify-write with retries: none is lost."""
    stores = [connect(), connect()]
    stores[0].put(make_profile("counter", description="0"))
    per_writer, conflicts = 12, [0, 0]

    def writer(k: int) -> None:
        store = stores[k]
        for _ in range(per_writer):
            while True:
                current = store.get("counter")
                bumped = current.model_copy(
                    update={"description": str(int(current.description) + 1)})
                try:
                    store.put(bumped, expected_version=current.version)
                    break
                except VersionConflict:
                    conflicts[k] += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = stores[1].get("counter")
    assert final.description == str(2 * per_writer)
    assert final.version == 2 * per_writer + 1


def test_delete_and_recreate(connect, make_profile):
    store = connect()
    store.put(make_profile("p"))
    store.put(make_profile("p", seed=1))
    with pytest.raises(VersionConflict):
        store.delete("p", expected_version=1)
    assert store.delete("p", expected_version=2) == 2
    with pytest.raises(ProfileNotFound):
        store.get("p")
    with pytest.raises(ProfileNotFound):
        store.get("p", 1)
    with pytest.raises(ProfileNotFound):
        store.delete("p")
    assert store.versions("p") == []
    assert [s.name for s in store.list()] == []
    # Versions continue after a delete, so (name, version) always names one content.
    assert store.put(make_profile("p"), expected_version=MUST_NOT_EXIST).version == 3


def test_list_summaries(connect, make_profile):
    store = connect()
    store.put(make_profile("b", description="bee"))
    store.put(make_profile("a", seed=3))
    store.put(make_profile("a", seed=4))
    summaries = {s.name: s for s in store.list()}
    assert sorted(summaries) == ["a", "b"]
    assert summaries["a"].version == 2 and summaries["b"].description == "bee"
    assert summaries["a"].size == make_profile("a", seed=4).size


def test_changes_since(connect, make_profile):
    store = connect()
    start = store.current_seq()
    store.put(make_profile("a"))
    store.put(make_profile("b"))
    store.put(make_profile("a", seed=1))
    store.delete("b")
    changes = store.changes(start)
    assert changes.seq == start + 4
    state = {e.name: (e.version, e.deleted) for e in changes.events}
    assert state == {"a": (2, False), "b": (1, True)}
    assert store.changes(changes.seq).events == []


def test_notification_reaches_another_client(connect, make_profile):
    writer, reader = connect(), connect()
    with reader.watch() as watch:
        writer.put(make_profile("p"))
        events = wait_for(watch, lambda seen: any(e.name == "p" for e in seen))
        assert events[-1].version == 1 and not events[-1].deleted
        writer.delete("p")
        events = wait_for(watch, lambda seen: any(e.deleted for e in seen))
        assert [(e.name, e.version, e.deleted) for e in events] == [("p", 1, True)]


def test_watch_since_resynchronises(connect, make_profile):
    store = connect()
    store.put(make_profile("a"))
    seq = store.current_seq()
    store.put(make_profile("b"))
    store.put(make_profile("a", seed=1))
    with connect().watch(since=seq) as watch:
        events = wait_for(watch, lambda seen: len(seen) >= 2)
    assert {(e.name, e.version) for e in events} == {("a", 2), ("b", 1)}


def test_async_facade(connect, make_profile):
    store = AsyncMaskStore(connect())
    other = connect()

    async def scenario():
        stored = await store.put(make_profile("p"), expected_version=0)
        assert (await store.get("p")) == stored
        events = []
        since = other.current_seq()  # the watch may start after the write below: no race

        async def listen():
            async for event in store.watch(since, poll_timeout=0.05):
                events.append(event)
                return

        task = asyncio.create_task(listen())
        await asyncio.sleep(0.2)
        other.put(make_profile("p", seed=1))
        await asyncio.wait_for(task, 5)
        assert events[0].version == 2
        assert [s.name for s in await store.list()] == ["p"]
        assert await store.delete("p") == 2

    asyncio.run(scenario())


def test_large_profile_round_trip(connect):
    """20% of 262,144 composite experts in each of 24 layers (timings: bench_masks.py)."""
    from masks.schema import MaskProfile, Provenance
    from monet_runtime import ExpertMask

    E, L = 512, 24
    rng = np.random.default_rng(0)
    keys = {l: rng.choice(E * E, E * E // 5, replace=False) for l in range(L)}
    mask = ExpertMask({l: np.stack(np.divmod(k, E), 1) for l, k in keys.items()}, num_experts=E)
    profile = MaskProfile(name="big", kind="manual", model_id="m", num_layers=L, num_experts=E,
                          experts=mask, provenance=Provenance(builder="test"))
    store = connect()
    store.put(profile)
    loaded = store.get("big")
    assert loaded.experts == mask and len(loaded.experts) == L * (E * E // 5)


def test_open_store(tmp_path, redis_server, namespace):
    assert isinstance(open_store(tmp_path / "s"), LocalMaskStore)
    assert isinstance(open_store(f"file://{tmp_path}/t"), LocalMaskStore)
    assert isinstance(open_store(None, default_dir=tmp_path / "u"), LocalMaskStore)
    store = open_store(redis_server.url, namespace=namespace)
    assert isinstance(store, RedisMaskStore)
    store.ping()
    store.close()


def test_write_reports_the_version_it_replaced(connect, make_profile):
    store = connect()
    first = store.write(make_profile("p"))
    assert (first.profile.version, first.previous_version) == (1, 0)
    assert store.write(make_profile("p", seed=1)).previous_version == 1
    store.delete("p")
    again = store.write(make_profile("p", seed=2))
    assert (again.profile.version, again.previous_version) == (3, 0)  # a tombstone is not live


def test_concurrent_unconditional_writes_one_creates(connect, make_profile):
    stores, results = [connect(), connect()], []
    lock = threading.Lock()

    def writer(k: int) -> None:
        for _ in range(10):
            written = stores[k % 2].write(make_profile("p"))
            with lock:
                results.append((written.previous_version, written.profile.version))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(v - 1, v) for v in range(1, 41)]


@pytest.mark.parametrize("writes_after", [0, 1, 3])
def test_watch_resets_when_the_store_is_not_the_one_it_followed(connect, make_profile,
                                                                writes_after):
    """Emptied, then written to until the seq is below, at or above the one the watch knows:
    (seq, token) differ, so the watch resets, whatever the seq."""
    writer, reader = connect(), connect()
    for seed in range(2):
        writer.put(make_profile("p", seed=seed))
    with reader.watch() as watch:
        writer.put(make_profile("q"))
        wait_for(watch, lambda seen: any(e.name == "q" for e in seen))
        assert watch.last_seq == 3
        connect.wipe()
        for k in range(writes_after):
            writer.put(make_profile("p", seed=10 + k))
        events = wait_for(watch, lambda seen: any(e.name == RESET for e in seen))
    assert {(e.name, e.version) for e in events if e.name != RESET} == (
        {("p", writes_after)} if writes_after else set())
    if writes_after:
        assert reader.get("p").digest == make_profile("p", seed=9 + writes_after).digest


def test_head_is_the_latest_write(connect, make_profile):
    store, other = connect(), connect()
    store.put(make_profile("p"))
    changes = store.changes(0)
    assert store.head() == (changes.seq, changes.token) == (store.current_seq(), changes.token)
    other.put(make_profile("p", seed=1))
    seq, token = store.head()
    assert seq == changes.seq + 1 and token not in ("", changes.token)
    connect.wipe()
    assert store.head() == (0, "")
    other.put(make_profile("p"))
    assert store.head()[0] == 1 and store.head()[1] not in ("", changes.token, token)


# ---- artifacts: named blobs beside the profiles -----------------------------------------
def test_artifact_round_trip_replace_and_delete(connect):
    from masks.store import ArtifactNotFound, digest_of

    store, other = connect(), connect()
    with pytest.raises(ArtifactNotFound):
        store.get_artifact("atlas:monet-x")
    with pytest.raises(ArtifactNotFound):
        store.artifact_digest("atlas:monet-x")
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    digest = store.put_artifact("atlas:monet-x", data)
    assert digest == digest_of(data) == other.artifact_digest("atlas:monet-x")
    got = other.get_artifact("atlas:monet-x")
    assert got.data == data and got.digest == digest
    assert store.put_artifact("atlas:monet-x", b"second") != digest
    assert other.get_artifact("atlas:monet-x").data == b"second"
    assert store.head() == (0, "")  # artifacts are not profile changes: caches stay put
    assert store.delete_artifact("atlas:monet-x") is True
    assert store.delete_artifact("atlas:monet-x") is False
    with pytest.raises(ArtifactNotFound):
        other.get_artifact("atlas:monet-x")


def test_artifact_bounds_and_names(connect, monkeypatch):
    import masks.store

    store = connect()
    for bad in ("", "Atlas", "a/b", "x" * 129, "../etc"):
        with pytest.raises(ValueError, match="artifact name"):
            store.put_artifact(bad, b"x")
        with pytest.raises(ValueError, match="artifact name"):
            store.get_artifact(bad)
    monkeypatch.setattr(masks.store, "MAX_ARTIFACT_BYTES", 1000)
    with pytest.raises(ValueError, match="at most 1000"):
        store.put_artifact("big", b"x" * 1001)
    store.put_artifact("big", b"x" * 1000)


def test_artifact_damaged_record_is_corrupt(connect, tmp_path, namespace, request):
    import sqlite3

    from masks.store import ArtifactCorrupt

    store = connect()
    store.put_artifact("atlas:m", b"good bytes")
    if isinstance(store, LocalMaskStore):
        db = sqlite3.connect(tmp_path / "store" / "masks.sqlite3")
        db.execute("UPDATE artifacts SET data = ? WHERE name = 'atlas:m'", (b"bad bytes!",))
        db.commit()
        db.close()
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_server").url)
        client.hset(f"{namespace}:artifact:atlas:m", "data", b"bad bytes!")
        client.close()
    with pytest.raises(ArtifactCorrupt, match="atlas:m"):
        store.get_artifact("atlas:m")


def test_artifact_unreachable_store_is_unavailable(tmp_path):
    from masks.store import StoreUnavailable

    store = RedisMaskStore.from_url("redis://127.0.0.1:1/0", connect_timeout=0.2, retries=0)
    for call in (lambda: store.get_artifact("a"), lambda: store.artifact_digest("a"),
                 lambda: store.put_artifact("a", b"x"), lambda: store.delete_artifact("a")):
        with pytest.raises(StoreUnavailable):
            call()
    store.close()
    local = LocalMaskStore(tmp_path / "gone")  # its database replaced by a directory
    (tmp_path / "gone" / "masks.sqlite3").unlink()
    (tmp_path / "gone" / "masks.sqlite3").mkdir()
    with pytest.raises(StoreUnavailable):
        local.get_artifact("a")
    local.close()
