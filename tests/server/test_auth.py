"""API keys: generate scope and admin scope, 401 / 403; operations endpoints stay open."""

from __future__ import annotations

import pytest
from server_support import ADMIN_KEY, GEN_KEY, client, unique

LAYERS = [{"layer": 0, "experts": [[0, 1]]}]


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/generate", {"prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/completions", {"model": "monet-vd-tiny", "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": "monet-vd-tiny", "max_tokens": 1,
                                      "messages": [{"role": "user", "content": "x"}]}),
    ("GET", "/v1/models", None),
    ("GET", "/masks", None),
    ("POST", "/inspect", {"text": "x"}),
])
def test_generate_scope(server, method, path, body):
    for key in (None, "not-a-key-000"):
        with client(server, key) as c:
            r = c.request(method, path, json=body)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["param"] == "Authorization"
    for key in (GEN_KEY, ADMIN_KEY):
        with client(server, key) as c:
            assert c.request(method, path, json=body).status_code == 200


def test_admin_scope(server):
    name = unique("auth")
    with client(server, GEN_KEY) as c:
        r = c.put(f"/masks/{name}", json={"layers": LAYERS})
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
        assert c.delete(f"/masks/{name}").status_code == 403
        assert c.post(f"/masks/{name}/build", json={"kind": "composite",
                                                    "parts": ["x"]}).status_code == 403
    with client(server, ADMIN_KEY) as c:
        assert c.put(f"/masks/{name}", json={"layers": LAYERS}).status_code == 201
    with client(server, None) as c:
        assert c.put(f"/masks/{name}", json={"layers": LAYERS}).status_code == 401


def test_operations_endpoints_are_open(server):
    with client(server, None) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code == 200
