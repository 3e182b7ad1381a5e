"""Live updates: a profile change applies to every request that starts after the PUT returns,
on this replica at once and on another replica sharing the Redis store within 1 s."""

from __future__ import annotations

import time

from server_support import ADMIN_KEY, client, unique

A = [{"layer": 0, "experts": [[0, 1]]}]
B = [{"layer": 1, "experts": [[2, 3]]}]


def applied(c, name: str) -> str:
    r = c.post("/generate", json={"prompt": "x", "max_tokens": 1, "mask_profile": name})
    return r.headers.get("x-monet-mask-profiles", str(r.status_code))


def test_same_replica_sees_a_write_at_once(server):
    name = unique("live")
    with client(server, ADMIN_KEY) as c:
        for version in range(1, 6):
            assert c.put(f"/masks/{name}", json={"layers": A if version % 2 else B}).json()[
                "version"] == version
            assert applied(c, name) == f"{name}@{version}"  # right after the PUT returned
        c.delete(f"/masks/{name}")
        assert applied(c, name) == "404"


def test_replica_sees_a_write_within_a_second(server, replica):
    name = unique("repl")
    with client(server, ADMIN_KEY) as main, client(replica) as other:
        main.put(f"/masks/{name}", json={"layers": A})
        assert applied(other, name) == f"{name}@1"  # now cached on the replica
        for version, action in ((2, "put"), (None, "delete")):
            if action == "put":
                main.put(f"/masks/{name}", json={"layers": B})
                want = f"{name}@{version}"
            else:
                main.delete(f"/masks/{name}")
                want = "404"
            start = time.monotonic()
            while applied(other, name) != want:
                assert time.monotonic() - start < 1.0, f"replica still serves the old {name}"
                time.sleep(0.02)
