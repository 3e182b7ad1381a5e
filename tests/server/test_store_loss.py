"""Store loss over real HTTP: a mask's identity is its contents. A redis-server of this module's
own (RDB snapshots only) is emptied or restored from an older snapshot under a running server;
a local store directory is wiped under two servers sharing it. A profile re-created under the
same name and version must be served with its new mask (greedy tokens against the golden
masked and unmasked ids), and one that is gone must be 404, from the first request after the
store came back: every masked request checks the store's head first, whatever the watch has
seen. The same check makes a write through one replica visible at once on another."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from masks import MaskProfile, Provenance, open_store
from server_support import ADMIN_KEY, KEYS_ENV, RedisProcess, ServerProcess, client, unique

EMPTY = {"layers": []}  # a mask that removes nothing: the unmasked answer


@pytest.fixture(scope="module")
def rdb_redis(tmp_path_factory):
    proc = RedisProcess(tmp_path_factory.mktemp("redis-rdb")).start()  # no AOF: SAVE only
    yield proc
    proc.stop()


def _serve(tmp, env=None, **args):
    flags = [a for k, v in args.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return ServerProcess(tmp, args=flags, env={**KEYS_ENV, **(env or {})})


@pytest.fixture(scope="module")
def on_redis(tmp_path_factory, rdb_redis, tiny):
    proc = _serve(tmp_path_factory.mktemp("loss-redis"), model=tiny / "model",
                  redis_url=rdb_redis.url).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def on_local(tmp_path_factory, tiny):
    """Two servers sharing one local store directory."""
    tmp = tmp_path_factory.mktemp("loss-local")
    procs = []
    for k in range(2):
        (tmp / f"s{k}").mkdir()
        procs.append(_serve(tmp / f"s{k}", model=tiny / "model", store_dir=tmp / "shared"))
    with ThreadPoolExecutor(2) as pool:  # the model loads take most of the time
        list(pool.map(ServerProcess.start, procs))
    yield tmp / "shared", procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def answers(golden):
    prompt = golden["input_ids"][0].tolist()
    return {"prompt": prompt, "unmasked": golden["greedy_ids"][0, len(prompt):].tolist(),
            "masked": golden["masked_greedy_ids"][0, len(prompt):].tolist()}


def generate(c, answers, profile):
    n = len(answers["masked"])
    return c.post("/generate", json={"prompt_token_ids": answers["prompt"], "max_tokens": n,
                                     "temperature": 0, "ignore_eos": True,
                                     "mask_profile": profile})


def until(check, what: str, timeout: float) -> float:
    """Poll check() until true; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def first(c, answers, profile):
    """One generate, timed: (response, seconds)."""
    start = time.monotonic()
    r = generate(c, answers, profile)
    return r, time.monotonic() - start


def tokens(c, answers, profile):
    r = generate(c, answers, profile)
    return r.json()["token_ids"] if r.status_code == 200 else r.status_code


def masked_profile(name: str, model_id: str, fixture_mask: dict) -> MaskProfile:
    return MaskProfile(name=name, kind="manual", model_id=model_id, num_layers=4,
                       num_experts=16, experts={"layers": fixture_mask["layers"]},
                       provenance=Provenance(builder="test"))


def test_redis_restarted_empty(on_redis, rdb_redis, answers, fixture_mask):
    name = unique("reborn")
    with client(on_redis, ADMIN_KEY) as c:
        assert c.put(f"/masks/{name}", json=EMPTY).status_code == 201
        model_id = c.get(f"/masks/{name}").json()["model_id"]
        assert tokens(c, answers, name) == answers["unmasked"]  # cached, union built
        before = generate(c, answers, name).json()["mask_profiles"][0].get("digest")

        rdb_redis.stop()
        (rdb_redis.directory / "dump.rdb").unlink(missing_ok=True)
        rdb_redis.start()  # same port, no data
        store = open_store(rdb_redis.url)
        assert store.put(masked_profile(name, model_id, fixture_mask)).version == 1
        store.close()
        # Same name, same version 1, other contents: the first request gets the new mask.
        r, took = first(c, answers, name)
        assert r.status_code == 200 and r.json()["token_ids"] == answers["masked"], r.text
        assert r.headers["x-monet-mask-profiles"] == f"{name}@1"
        assert r.json()["mask_profiles"][0]["digest"] != before  # the body tells them apart
    print(f"redis restarted empty: the first request got the new mask in {took:.2f} s")


def test_redis_restored_from_an_older_snapshot(on_redis, rdb_redis, answers, fixture_mask):
    kept, gone, filler = unique("kept"), unique("gone"), unique("filler")
    admin = redis.Redis.from_url(rdb_redis.url)
    with client(on_redis, ADMIN_KEY) as c:
        assert c.put(f"/masks/{kept}", json=EMPTY).status_code == 201
        model_id = c.get(f"/masks/{kept}").json()["model_id"]
        admin.save()  # the snapshot: kept@1
        snapshot = (rdb_redis.directory / "dump.rdb").read_bytes()
        assert c.put(f"/masks/{kept}", json=EMPTY).status_code == 200  # kept@2
        assert c.put(f"/masks/{gone}", json=EMPTY).status_code == 201
        assert tokens(c, answers, kept) == answers["unmasked"]
        assert tokens(c, answers, gone) == answers["unmasked"]

        rdb_redis.stop()
        (rdb_redis.directory / "dump.rdb").write_bytes(snapshot)
        rdb_redis.start()
        # Two writes, before the watch is back: the change sequence catches up with the one
        # the server knows, and kept@2 comes back with other contents.
        store = open_store(rdb_redis.url)
        assert store.put(masked_profile(kept, model_id, fixture_mask)).version == 2
        store.put(masked_profile(filler, model_id, fixture_mask))
        store.close()
        r, took_gone = first(c, answers, gone)
        assert r.status_code == 404, r.text
        assert c.get(f"/masks/{gone}").status_code == 404
        r, took_kept = first(c, answers, kept)
        assert r.status_code == 200 and r.json()["token_ids"] == answers["masked"], r.text
        assert r.headers["x-monet-mask-profiles"] == f"{kept}@2"
    admin.close()
    print(f"redis restored: the first requests got 404 in {took_gone:.2f} s, "
          f"the new mask in {took_kept:.2f} s")


@pytest.mark.parametrize("pause", [0.0, 0.1, 0.3])
def test_local_store_wiped_under_two_servers(on_local, answers, fixture_mask, pause):
    """Wiped, then re-created `pause` seconds later (before, around and after the other
    server's watch polls the empty directory, every 0.2 s)."""
    root, (a, b) = on_local
    name = unique("wiped")
    with client(a, ADMIN_KEY) as ca, client(b, ADMIN_KEY) as cb:
        assert ca.put(f"/masks/{name}", json=EMPTY).status_code == 201
        for c in (ca, cb):
            assert tokens(c, answers, name) == answers["unmasked"]
        shutil.rmtree(root)
        time.sleep(pause)
        r = ca.put(f"/masks/{name}", json={"layers": fixture_mask["layers"]})
        assert r.status_code == 201 and r.json()["version"] == 1, r.text
        digest = r.json()["digest"]
        for c in (cb, ca):  # the other server first: its watch may not have polled yet
            r, took = first(c, answers, name)
            assert r.status_code == 200, r.text
            assert r.json()["mask_profiles"][0]["digest"] == digest, r.text
            assert r.json()["token_ids"] == answers["masked"], (
                f"{'b' if c is cb else 'a'} answered "
                f"unmasked={r.json()['token_ids'] == answers['unmasked']} under {r.text}; "
                f"a has {ca.get(f'/masks/{name}').text[:300]}")
            assert r.headers["x-monet-mask-profiles"] == f"{name}@1"
    print(f"local store wiped ({pause} s before the write): the first request on each server "
          f"got the new mask (the last in {took:.2f} s)")


@pytest.mark.parametrize("pair", ["redis", "local"])
def test_a_write_on_one_replica_is_served_at_once_by_the_other(request, pair, answers,
                                                               fixture_mask):
    """PUT through one replica, then generate on the other at once: the new version's mask
    and header, each way, several times. On Redis the watches' subscriptions are cut before
    each write, as a dropped connection would (the notification is lost; reconnecting takes
    up to a second); the local store's watch polls every 0.2 s."""
    if pair == "redis":
        a, b = request.getfixturevalue("server"), request.getfixturevalue("replica")
        admin = redis.Redis.from_url(request.getfixturevalue("redis_server").url)
        lose_notifications = lambda: admin.client_kill_filter(_type="pubsub")  # noqa: E731
    else:
        a, b = request.getfixturevalue("on_local")[1]
        admin, lose_notifications = None, lambda: None
    name = unique("ryw")
    bodies = [EMPTY, {"layers": fixture_mask["layers"]}]
    with client(a, ADMIN_KEY) as ca, client(b, ADMIN_KEY) as cb:
        assert ca.put(f"/masks/{name}", json=EMPTY).status_code == 201
        for c in (ca, cb):
            assert tokens(c, answers, name) == answers["unmasked"]  # cached on both
        for version in range(2, 8):
            writer, reader = (ca, cb) if version % 2 else (cb, ca)
            mask = bodies[(version - 1) % 2]
            lose_notifications()
            assert writer.put(f"/masks/{name}", json=mask).is_success
            want = answers["masked"] if mask is not EMPTY else answers["unmasked"]
            for c in (reader, writer):  # the reader has the version before cached; then both
                r = generate(c, answers, name)  # have this one, for the next round
                assert r.status_code == 200, r.text
                assert r.headers["x-monet-mask-profiles"] == f"{name}@{version}"
                assert r.json()["token_ids"] == want, f"version {version}"
    if admin is not None:
        admin.close()


# ---- corruption: one bad record fails its profile only; the watch outlives anything ----------
def test_redis_value_corrupt_fails_that_profile_only(on_redis, rdb_redis, answers,
                                                     fixture_mask):
    good, bad = unique("good"), unique("bad")
    admin = redis.Redis.from_url(rdb_redis.url)
    with client(on_redis, ADMIN_KEY) as c:
        for name in (good, bad):
            assert c.put(f"/masks/{name}", json={"layers": fixture_mask["layers"]}).is_success
        admin.set(f"monet:masks:blob:{bad}:1", b"garbage")
        admin.hset("monet:masks:summaries", bad, b"1 {truncated")
        r = generate(c, answers, bad)
        assert r.status_code == 503 and bad in r.json()["error"]["message"], r.text
        assert "corrupt" in r.json()["error"]["message"]
        assert tokens(c, answers, good) == answers["masked"]
        listed = c.get("/masks")
        assert listed.status_code == 200, listed.text
        assert good in [p["name"] for p in listed.json()]
        assert bad not in [p["name"] for p in listed.json()]
        r = c.get(f"/masks/{bad}")
        assert r.status_code == 503 and bad in r.json()["error"]["message"]
        assert c.get("/ready").status_code == 200
        # Repaired by writing it again: served, no restart.
        assert c.put(f"/masks/{bad}", json={"layers": fixture_mask["layers"]}).status_code == 200
        assert tokens(c, answers, bad) == answers["masked"]
    admin.close()


def test_redis_bad_sequence_watch_unhealthy_then_recovers(on_redis, rdb_redis, answers):
    name = unique("seq")
    admin = redis.Redis.from_url(rdb_redis.url)
    with client(on_redis, ADMIN_KEY) as c:
        assert c.put(f"/masks/{name}", json=EMPTY).status_code == 201
        seq = admin.get("monet:masks:seq")
        admin.set("monet:masks:seq", b"garbage")
        took = until(lambda: c.get("/ready").status_code == 503, "/ready to see the watch fail",
                     timeout=10)
        checks = c.get("/ready").json()["checks"]
        assert checks["mask_watch"] is False and "seq" in checks["mask_watch_error"], checks
        assert checks["mask_store"] is True  # reachable; its data is what is wrong
        admin.set("monet:masks:seq", seq)
        healed = until(lambda: c.get("/ready").status_code == 200, "recovery", timeout=10)
        assert tokens(c, answers, name) == answers["unmasked"]
    admin.close()
    print(f"bad seq: /ready 503 after {took:.2f} s, 200 again {healed:.2f} s after repair")


def test_local_record_corrupt_fails_that_profile_only(on_local, answers, fixture_mask):
    import sqlite3

    root, (a, b) = on_local
    good, bad = unique("good"), unique("bad")
    with client(a, ADMIN_KEY) as ca, client(b, ADMIN_KEY) as cb:
        for name in (good, bad):
            assert ca.put(f"/masks/{name}", json={"layers": fixture_mask["layers"]}).is_success
        with sqlite3.connect(root / "masks.sqlite3") as db:  # truncated blob, garbled summary
            db.execute("UPDATE blobs SET data = substr(data, 1, 20) WHERE name = ?", (bad,))
            db.execute("UPDATE heads SET summary = '{\"trunc' WHERE name = ?", (bad,))
        for c in (ca, cb):
            r = generate(c, answers, bad)
            assert r.status_code == 503 and bad in r.json()["error"]["message"], r.text
            assert tokens(c, answers, good) == answers["masked"]
            listed = c.get("/masks")
            assert listed.status_code == 200, listed.text
            assert [p["name"] for p in listed.json()].count(bad) == 0
            assert c.get(f"/masks/{bad}").status_code == 503
            assert c.get("/ready").status_code == 200
        assert cb.put(f"/masks/{bad}", json={"layers": fixture_mask["layers"]}).status_code == 200
        for c in (ca, cb):
            assert tokens(c, answers, bad) == answers["masked"]  # the first request after


# ---- concurrent writes: status and audit from the write itself ------------------------------
def test_concurrent_unconditional_puts_one_created(server, replica):
    name, n = unique("race"), 200
    body = {"layers": [{"layer": 0, "experts": [[1, 2]]}]}
    clients = [client(s, ADMIN_KEY) for s in (server, replica)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda k: clients[k % 2].put(f"/masks/{name}", json=body),
                                range(n)))
    for c in clients:
        c.close()
    assert all(r.is_success for r in results), [r.text for r in results if not r.is_success]
    created = [r.json() for r in results if r.status_code == 201]
    assert len(created) == 1 and created[0]["previous_version"] == 0, created
    pairs = sorted((r.json()["previous_version"], r.json()["version"]) for r in results)
    assert pairs == [(v - 1, v) for v in range(1, n + 1)]  # each write saw the one before
    time.sleep(0.5)  # the audit lines are flushed per line; give the last a moment
    audit = [l for s in (server, replica) for l in s.log_lines()
             if l.get("logger") == "monet.audit" and l.get("profile") == name]
    assert len(audit) == n
    assert sorted(l["previous_version"] for l in audit) == list(range(n))
