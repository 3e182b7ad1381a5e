"""A server with no API keys, no --model and no Redis URL: the bundled default model, the
embedded local store, localhost only. Limits: overload (429), client disconnects abort their
generation, and shutdown drains in-flight requests (the last test stops this server)."""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import ServerProcess, unique

LONG = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    env = {k: "" for k in os.environ if k.startswith("MONET_")}
    env |= {"MONET_API_KEYS": "", "MONET_ADMIN_KEYS": "", "MONET_MAX_CONCURRENT_REQUESTS": "2"}
    proc = ServerProcess(tmp, args=["--host", "0.0.0.0", "--store-dir", str(tmp / "masks")],
                         env=env)
    proc.store = tmp / "masks"
    yield proc.start()
    proc.stop()


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(condition, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _own_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_no_keys_binds_localhost_and_says_so(local):
    warnings = [l["msg"] for l in local.log_lines() if l.get("level") == "warning"]
    assert any("no API keys configured" in m and "127.0.0.1" in m for m in warnings), warnings
    listening = [l for l in local.log_lines() if l.get("msg") == "listening"]
    assert listening[0]["host"] == "127.0.0.1"
    address = _own_address()
    if address is not None:  # asked for 0.0.0.0, but not reachable from outside
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{address}:{local.port}/health", timeout=2)


def test_default_model_and_local_store(local):
    with httpx.Client(base_url=local.url, timeout=30) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "monet-default"
        name = unique("local")
        r = c.put(f"/masks/{name}", json={"layers": [{"layer": 0, "experts": [[1, 2]]}]})
        assert r.status_code == 201, r.text
        assert (local.store / "masks.sqlite3").exists()
        r = c.post("/generate", json={"prompt": "hi", "max_tokens": 3, "mask_profile": name})
        assert r.headers["x-monet-mask-profiles"] == f"{name}@1"
        assert c.get("/ready").json()["ready"] is True


def test_overload_is_429(local):
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        httpx.post(f"{local.url}/generate", json={**LONG, "max_tokens": 300},
                   timeout=300).status_code))
        for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(local, "monet_num_requests_in_flight") == 2, what="2 in flight")
    r = httpx.post(f"{local.url}/generate", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "concurrent" in r.json()["error"]["message"]
    for t in threads:
        t.join()
    assert results == [200, 200]
    assert metric(local, "monet_requests_rejected_total", reason="concurrency") >= 1


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts(local, stream):
    aborted = metric(local, "monet_request_success_total", finished_reason="abort")
    tokens = metric(local, "monet_generation_tokens_total")
    if stream:
        with httpx.stream("POST", f"{local.url}/generate", json={**LONG, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one token, then hang up
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{local.url}/generate", json=LONG, timeout=0.5)
    wait_for(lambda: metric(local, "monet_request_success_total", finished_reason="abort")
             == aborted + 1, what="the abort")
    wait_for(lambda: metric(local, "monet_num_requests_running") == 0, what="an idle engine")
    assert metric(local, "monet_generation_tokens_total") - tokens < 1000


def test_shutdown_drains_in_flight_requests(local):
    """SIGTERM while a request runs: it still completes, then the process exits cleanly."""
    result = {}

    def long_request():
        r = httpx.post(f"{local.url}/generate", json={**LONG, "max_tokens": 400}, timeout=300)
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=long_request)
    t.start()
    wait_for(lambda: metric(local, "monet_num_requests_running") == 1, what="a running request")
    local.terminate()
    t.join(timeout=300)
    assert result["status"] == 200
    assert len(result["body"]["token_ids"]) == 400 and result["body"]["finish_reason"] == "length"
    assert local.proc.wait(timeout=60) == 0  # drained
    assert "Application shutdown complete." in local.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{local.url}/health", timeout=2)
