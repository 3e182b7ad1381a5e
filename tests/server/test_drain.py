"""SIGTERM with long generations in flight, streaming and not, while two busy processes hold
the cores: every generation finishes (200, streams end with their finish_reason and [DONE]),
a new request during the drain gets 503, and `monet serve` exits 0 within the drain timeout;
past the timeout the generations still running end cleanly with finish_reason "abort"."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import ServerProcess

N_REQUESTS = 6


@contextlib.contextmanager
def cpu_hogs(n: int = 2):
    """n busy processes, one per core here (started once the server is up)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _wait_in_flight(url: str, n: int, timeout: float = 60) -> bool:
    """Until the server has n generations in flight (running or waiting for the engine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            if family.name == "monet_num_requests_in_flight" and family.samples[0].value >= n:
                return True
        time.sleep(0.1)
    return False


def _generate(url: str, n: int, max_tokens: int, out: dict) -> None:
    body = {"prompt_token_ids": [1, 5 + n, 9], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    try:
        if n % 2:  # streaming: the finish reason of the last chunk, and whether [DONE] came
            reason, done, tokens = None, False, 0
            with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True},
                              timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        tokens += len(chunk.get("token_ids", []))
                        reason = chunk.get("finish_reason") or chunk.get("error") or reason
            out[n] = (r.status_code, reason, tokens, done)
        else:
            r = httpx.post(f"{url}/generate", json=body, timeout=120)
            data = r.json()
            out[n] = (r.status_code, data.get("finish_reason"), len(data.get("token_ids", [])),
                      True)
    except httpx.HTTPError as e:
        out[n] = (type(e).__name__, None, 0, False)


def drain(tmp_path, *, drain_timeout: float, max_tokens: int) -> tuple[dict, int, float, object]:
    """Start the server (default CPU threads), N long requests, SIGTERM once all are in;
    (results, exit status, seconds from the signal to the exit, a late request's status)."""
    server = ServerProcess(tmp_path, args=["--engine", "runtime"],
                           env={"MONET_THREADS": "", "MONET_DRAIN_TIMEOUT_S": str(drain_timeout),
                                "MONET_MAX_TOKENS": "512"})
    server.start()
    with cpu_hogs():
        return _drain(server, drain_timeout=drain_timeout, max_tokens=max_tokens)


def _drain(server: ServerProcess, *, drain_timeout: float, max_tokens: int):
    results: dict = {}
    threads = [threading.Thread(target=_generate, args=(server.url, n, max_tokens, results))
               for n in range(N_REQUESTS)]
    for t in threads:
        t.start()
    try:
        assert _wait_in_flight(server.url, N_REQUESTS), server.log()
        signalled = time.monotonic()
        server.terminate()
        time.sleep(0.3)
        try:
            late = httpx.post(f"{server.url}/generate", json={"prompt": "late"},
                              timeout=10).status_code
        except httpx.HTTPError as e:
            late = type(e).__name__
        status = server.proc.wait(timeout=drain_timeout + 30)
        took = time.monotonic() - signalled
    finally:
        server.stop()
        for t in threads:
            t.join(60)
    return results, status, took, late


@pytest.mark.slow
def test_sigterm_drains_long_generations_under_cpu_contention(tmp_path):
    results, status, took, late = drain(tmp_path, drain_timeout=60, max_tokens=100)
    assert late == 503
    assert [results[n] for n in range(N_REQUESTS)] == [(200, "length", 100, True)] * N_REQUESTS
    assert status == 0 and took < 60


@pytest.mark.slow
def test_generations_past_the_drain_timeout_end_cleanly(tmp_path):
    results, status, took, late = drain(tmp_path, drain_timeout=4, max_tokens=500)
    assert late == 503
    aborted = [results[n] for n in range(N_REQUESTS) if results[n][1] == "abort"]
    finished = [results[n] for n in range(N_REQUESTS) if results[n][1] != "abort"]
    assert aborted and all(code == 200 and done and n < 500 for code, _, n, done in aborted)
    assert finished == [(200, "length", 500, True)] * len(finished)  # done before the signal
    assert status == 0 and took < 4 + 1.5
