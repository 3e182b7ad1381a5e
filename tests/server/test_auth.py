"""API keys: generate scope and admin scope, 401 / 403; /health and /ready stay open, /metrics
and the docs need a key unless MONET_PUBLIC_METRICS / MONET_PUBLIC_DOCS; MONET_ALLOWED_HOSTS."""

from __future__ import annotations

import pytest
from server_support import ADMIN_KEY, GEN_KEY, KEYS_ENV, ServerProcess, client, unique

LAYERS = [{"layer": 0, "experts": [[0, 1]]}]


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/generate", {"prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/completions", {"model": "monet-vd-tiny", "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": "monet-vd-tiny", "max_tokens": 1,
                                      "messages": [{"role": "user", "content": "x"}]}),
    ("GET", "/v1/models", None),
    ("GET", "/masks", None),
    ("POST", "/inspect", {"text": "x"}),
    ("POST", "/tokenize", {"prompt": "x"}),
    ("POST", "/detokenize", {"tokens": [3]}),
    ("GET", "/tokenizer_info", None),
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


def test_operations_endpoints_are_open_metrics_and_docs_need_a_key(server):
    with client(server, None) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").status_code == 200
        for path in ("/metrics", "/openapi.json", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization", path
    with client(server, GEN_KEY) as c:
        assert "monet_requests_total" in c.get("/metrics").text
        assert c.get("/openapi.json").json()["info"]["title"] == "monet-serve"
        assert "swagger" in c.get("/docs").text.lower()


@pytest.fixture(scope="module")
def public(tmp_path_factory, tiny):
    """Keys, but metrics and docs public, and a Host allow-list (a proxy's name)."""
    env = {**KEYS_ENV, "MONET_PUBLIC_METRICS": "true", "MONET_PUBLIC_DOCS": "1",
           "MONET_ALLOWED_HOSTS": "monet.example.org,127.0.0.1"}
    proc = ServerProcess(tmp_path_factory.mktemp("public"), env=env,
                         args=["--model", str(tiny / "model")])
    yield proc.start()
    proc.stop()


def test_public_metrics_and_docs_and_allowed_hosts(public):
    with client(public, None) as c:
        for path in ("/metrics", "/openapi.json", "/docs", "/health"):
            assert c.get(path).status_code == 200, path
        assert c.get("/masks").status_code == 401  # the API still needs a key
        assert c.get("/health", headers={"Host": "monet.example.org:443"}).status_code == 200
        r = c.get("/health", headers={"Host": "other.example.org"})
        assert r.status_code == 421 and r.json()["error"]["param"] == "Host"
