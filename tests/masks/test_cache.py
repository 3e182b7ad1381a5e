"""ProfileCache: hits without I/O, invalidation by another replica's writes, fail closed."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from masks.cache import ProfileCache
from masks.local_store import LocalMaskStore
from masks.redis_store import RedisMaskStore
from masks.schema import ModelMismatch
from masks.store import ProfileNotFound, StoreUnavailable


class CountingStore:
    """Wraps a store and counts reads."""

    def __init__(self, store):
        self.store, self.reads, self.catch_ups = store, 0, 0

    def get(self, name, version=None):
        self.reads += 1
        return self.store.get(name, version)

    def changes(self, since=0):
        self.catch_ups += 1
        return self.store.changes(since)

    def __getattr__(self, name):
        return getattr(self.store, name)


def eventually(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


@pytest.fixture(params=["local", "redis"])
def two_replicas(request, tmp_path, namespace):
    if request.param == "local":
        make = lambda: LocalMaskStore(tmp_path / "s", poll_interval=0.02)  # noqa: E731
    else:
        url = request.getfixturevalue("redis_server").url
        make = lambda: RedisMaskStore.from_url(url, namespace=namespace)  # noqa: E731
    return make(), make()


def wipe(store) -> None:
    """Lose everything the store holds, as a wiped directory or a flushed Redis would."""
    if isinstance(store, LocalMaskStore):
        shutil.rmtree(store.root)
    else:
        store.client.delete(*store.client.keys(f"{store.ns}*"))


def test_cache_hits_and_invalidation(two_replicas, make_profile):
    writer, reader = two_replicas
    writer.put(make_profile("p", model_id="monet-a"))
    counting = CountingStore(reader)
    cache = ProfileCache(counting, model_id="monet-a", poll_timeout=0.05).start()
    try:
        assert cache.get("p").version == 1
        assert cache.get("p").version == 1 and counting.reads == 1  # a hit: no I/O
        writer.put(make_profile("p", seed=1, model_id="monet-a"))
        eventually(lambda: cache.get("p").version == 2)
        writer.delete("p")
        eventually(lambda: "p" not in cache._latest)
        with pytest.raises(ProfileNotFound):
            cache.get("p")
        writer.put(make_profile("q", model_id="monet-b"))
        with pytest.raises(ModelMismatch):
            cache.get("q")
    finally:
        cache.close()


def test_cache_fails_closed_when_the_store_goes_away(private_redis, namespace, make_profile):
    store = RedisMaskStore.from_url(private_redis.url, namespace=namespace,
                                    connect_timeout=0.2, retries=0)
    store.put(make_profile("p"))
    cache = ProfileCache(store, max_staleness=0.5, poll_timeout=0.05).start()
    try:
        assert cache.get("p").version == 1
        private_redis.stop()
        time.sleep(0.8)
        with pytest.raises(StoreUnavailable):
            cache.get("p")  # cached, but possibly stale: refused
        private_redis.start()  # empty again: the watch sees the reset
        eventually(lambda: cache.last_error is None, timeout=10)
        with pytest.raises(ProfileNotFound):
            cache.get("p")
    finally:
        cache.close()
        store.close()


def test_every_get_is_current_without_the_watch(two_replicas, make_profile):
    """No watch thread: each get asks the store's head, so another replica's write or delete
    shows in the very next get, and concurrent gets share one catch-up."""
    writer, reader = two_replicas
    writer.put(make_profile("p", model_id="monet-a"))
    counting = CountingStore(reader)
    cache = ProfileCache(counting, model_id="monet-a")
    assert cache.get("p").version == 1 and cache.get("p").version == 1
    assert (counting.reads, counting.catch_ups) == (1, 0)  # a hit costs one head, no read
    second = writer.put(make_profile("p", seed=1, model_id="monet-a"))
    barrier, got = threading.Barrier(8), []

    def read() -> None:
        barrier.wait()
        got.append(cache.get("p").digest)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [second.digest] * 8
    assert counting.catch_ups == 1
    writer.delete("p")
    with pytest.raises(ProfileNotFound):
        cache.get("p")


def test_a_watch_behind_does_not_vouch_for_entries_of_a_lost_history(two_replicas,
                                                                     make_profile):
    """The watch last saw the store empty; a request then cached p@1 of that history. The
    store loses its data and p@1 is written again with other contents: the watch's next poll
    reads p@1 as a plain continuation of the empty store, and must not make the old p@1 current
    (the first failure of test_local_store_wiped_under_two_servers, caught in CI)."""
    writer, reader = two_replicas
    cache = ProfileCache(reader, model_id="monet-a")
    cache.refresh()  # the watch starts at the empty store
    writer.put(make_profile("p", model_id="monet-a"))
    assert cache.get("p").version == 1  # a request catches up without the watch, caches p@1
    wipe(writer)
    second = writer.put(make_profile("p", seed=1, model_id="monet-a"))
    assert second.version == 1
    deadline = time.monotonic() + 5
    while not cache.refresh(0.1):  # Redis: the notification may take a moment
        assert time.monotonic() < deadline, "the watch never saw the write"
    assert cache.get("p").digest == second.digest
    cache.close()
