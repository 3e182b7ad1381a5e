"""Fail closed, on a server of its own with a private Redis and a server-wide default profile:
the default applies to every request and cannot be opted out of; with Redis stopped in the
middle of a test, cached profiles serve until their staleness bound, then 503; a request that
asks for a mask is never answered without it."""

from __future__ import annotations

import time

import pytest
from masks import MaskProfile, Provenance, open_store
from server_support import ADMIN_KEY, KEYS_ENV, RedisProcess, ServerProcess, client, unique

STALENESS = 2.0
DEFAULT = "default-purge"


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    proc = RedisProcess(tmp_path_factory.mktemp("redis-private"), persist=True).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, private_redis, tiny, fixture_mask):
    import torch

    from monet_runtime import load_model

    identity = load_model(tiny / "model", dtype=torch.float32, tokenizer=False).identity
    store = open_store(private_redis.url)
    store.put(MaskProfile(name=DEFAULT, kind="toxicity", model_id=identity, num_layers=4,
                          num_experts=16, experts=fixture_mask,
                          provenance=Provenance(builder="test")))
    store.close()
    proc = ServerProcess(tmp_path_factory.mktemp("guarded"), args=[
        "--model", str(tiny / "model"), "--redis-url", private_redis.url,
        "--default-profile", DEFAULT],
        env={**KEYS_ENV, "MONET_MASK_STALENESS_S": str(STALENESS)})
    yield proc.start()
    proc.stop()


def generate(c, **body):
    return c.post("/generate", json={"max_tokens": 16, "temperature": 0, "ignore_eos": True,
                                     **body})


def test_default_profile_always_applies(guarded, golden):
    prompt = golden["input_ids"][0].tolist()
    masked = golden["masked_greedy_ids"][0, len(prompt):].tolist()
    with client(guarded, ADMIN_KEY) as c:
        for extra in ({}, {"mask_profile": []}, {"mask_profile": None}):
            r = generate(c, prompt_token_ids=prompt, **extra)
            assert r.status_code == 200, r.text
            assert r.json()["token_ids"] == masked  # the default's mask is really applied
            assert r.headers["x-monet-mask-profiles"] == f"{DEFAULT}@1"
            applied = r.json()["mask_profiles"]
            assert [{k: a[k] for k in ("name", "version", "default")} for a in applied] == [
                {"name": DEFAULT, "version": 1, "default": True}]
            assert len(applied[0]["digest"]) == 16
        other = unique("extra")
        c.put(f"/masks/{other}", json={"layers": [{"layer": 0, "experts": [[0, 0]]}]})
        r = generate(c, prompt_token_ids=prompt, mask_profile=other)
        assert r.headers["x-monet-mask-profiles"] == f"{other}@1,{DEFAULT}@1"
        r = c.post("/v1/completions", json={"model": "monet-vd-tiny", "prompt": prompt,
                                            "max_tokens": 16, "temperature": 0,
                                            "ignore_eos": True})
        assert r.headers["x-monet-mask-profiles"] == f"{DEFAULT}@1"
        assert c.get("/ready").json()["checks"]["default_profile"] == f"{DEFAULT}@1"


def test_a_redis_that_stops_answering_costs_a_request_no_more_than_the_head_timeout(
        guarded, private_redis):
    """A paused Redis (as a network partition looks: connected, silent): a cached profile is
    served from the cache after the store's short head timeout, within the staleness bound, not
    after the client's socket timeout or the pause."""
    import redis

    name = unique("paused")
    with client(guarded, ADMIN_KEY) as c:
        c.put(f"/masks/{name}", json={"layers": [{"layer": 1, "experts": [[3, 4]]}]})
        assert generate(c, prompt="a", mask_profile=name).status_code == 200  # now cached
        redis.Redis.from_url(private_redis.url).execute_command("CLIENT", "PAUSE", 4000, "ALL")
        paused = time.monotonic()
        r = generate(c, prompt="a", mask_profile=name)
        took = time.monotonic() - paused
    assert r.status_code == 200 and r.headers["x-monet-mask-profiles"] == f"{name}@1,{DEFAULT}@1"
    assert took < 3.0, f"waited {took:.1f} s on a silent Redis"  # the pause lasts 4 s
    time.sleep(max(0.0, 4.5 - (time.monotonic() - paused)))  # the next test starts unpaused


def test_redis_stopped_in_the_middle(guarded, private_redis):
    cached, uncached = unique("cached"), unique("uncached")
    with client(guarded, ADMIN_KEY) as c:
        for name in (cached, uncached):
            c.put(f"/masks/{name}", json={"layers": [{"layer": 1, "experts": [[3, 4]]}]})
        assert generate(c, prompt="a", mask_profile=cached).status_code == 200  # now cached

        private_redis.stop()
        stopped = time.monotonic()
        r = generate(c, prompt="a", mask_profile=cached)  # cached, within the bound: served
        assert r.status_code == 200 and r.headers["x-monet-mask-profiles"] == (
            f"{cached}@1,{DEFAULT}@1")
        r = generate(c, prompt="a", mask_profile=uncached)  # never cached: refused
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["param"] == "mask_profile"
        r = c.put(f"/masks/{cached}", json={"layers": [{"layer": 0, "experts": [[1, 1]]}]})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert c.get("/masks").status_code == 503
        ready = c.get("/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["mask_store"] is False
        assert time.monotonic() - stopped < STALENESS, "too slow to test within the bound"

        time.sleep(max(0.0, STALENESS + 1.0 - (time.monotonic() - stopped)))
        for body in ({"mask_profile": cached}, {}):  # stale: nothing is served, not even
            r = generate(c, prompt="a", **body)      # an unmasked request (the default)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"]
        r = c.get("/experts/search", params={"label": "python"})  # the atlas: never "none"
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert c.get("/health").status_code == 200

        private_redis.start()  # same port; AOF keeps the profiles
        deadline = time.monotonic() + 15
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "server did not recover after Redis restarted"
            time.sleep(0.2)
        r = generate(c, prompt="a", mask_profile=uncached)
        assert r.status_code == 200 and r.headers["x-monet-mask-profiles"] == (
            f"{uncached}@1,{DEFAULT}@1")
    metrics = client(guarded).get("/metrics").text
    assert 'monet_mask_store_errors_total{operation="get"}' in metrics


def test_default_profile_deleted_means_nothing_is_served(guarded):
    with client(guarded, ADMIN_KEY) as c:
        assert c.delete(f"/masks/{DEFAULT}").status_code == 200
        r = generate(c, prompt="a")
        assert r.status_code == 503 and DEFAULT in r.json()["error"]["message"]
        assert c.get("/ready").status_code == 503
        c.put(f"/masks/{DEFAULT}", json={"kind": "toxicity",
                                         "layers": [{"layer": 0, "experts": [[0, 0]]}]})
        r = generate(c, prompt="a")
        assert r.status_code == 200 and r.headers["x-monet-mask-profiles"] == f"{DEFAULT}@2"
