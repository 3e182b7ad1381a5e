"""`monet serve` on the vLLM engine: the README's command (no options) serves the bundled
model through vLLM; the same HTTP API as on the runtime engine; and a clear error when vLLM is
asked for but missing (where it is not installed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import ADMIN_KEY, KEYS_ENV, ROOT, ServerProcess, client, unique

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_asking_for_vllm_without_it_is_a_clear_error(tiny):
    r = subprocess.run([sys.executable, "-m", "monet_cli.main", "serve", "--engine", "vllm",
                        "--model", str(tiny / "model")], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "vLLM is not installed" in r.stderr and "--engine runtime" in r.stderr


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, redis_server, tiny):
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (scripts/setup.sh installs it)")
    # non-default engine settings, each observable below (MONET_THREADS is the runtime's:
    # vLLM refuses it)
    proc = ServerProcess(tmp_path_factory.mktemp("vllm"), env={**KEYS_ENV, "MONET_THREADS": ""},
                         args=["--model", str(tiny / "model"), "--redis-url", redis_server.url,
                               "--engine", "vllm", "--max-model-len", "128", "--mask-slots", "3",
                               "--max-batch-size", "8"])
    yield proc.start(timeout=600)
    proc.stop()


@pytest.mark.slow
def test_masked_generation_on_vllm(vllm_server, fixture_mask, golden):
    prompt = golden["input_ids"][0].tolist()
    n = golden["greedy_ids"].shape[1] - len(prompt)
    name = unique("vllm")
    with client(vllm_server, ADMIN_KEY) as c:
        assert c.get("/ready").status_code == 200
        assert c.put(f"/masks/{name}", json={"layers": fixture_mask["layers"]}).status_code == 201
        body = {"prompt_token_ids": prompt, "max_tokens": n, "temperature": 0,
                "ignore_eos": True}
        plain = c.post("/generate", json=body)
        masked = c.post("/generate", json={**body, "mask_profile": name})
        assert plain.json()["token_ids"] == golden["greedy_ids"][0, len(prompt):].tolist()
        assert masked.json()["token_ids"] == golden["masked_greedy_ids"][0, len(prompt):].tolist()
        assert masked.headers["x-monet-mask-profiles"] == f"{name}@1"
        chunks = []
        with c.stream("POST", "/generate", json={**body, "mask_profile": name,
                                                 "stream": True}) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]" and len(chunks) == n + 1
        r = c.post("/inspect", json={"prompt_token_ids": prompt, "profiles": [name]})
        assert r.status_code == 200 and len(r.json()["tokens"]) == len(prompt)
        metrics = {s.name: s.value for f in text_string_to_metric_families(c.get("/metrics").text)
                   for s in f.samples}
    # the three generations reported their queue time (vLLM's scheduler timestamps)
    assert metrics["monet_request_queue_time_seconds_count"] == 3
    assert metrics["monet_num_requests_running"] == metrics["monet_num_requests_waiting"] == 0
    # vLLM's own metrics are served next to ours: the three generations' tokens, the KV cache
    assert metrics["vllm:generation_tokens_total"] >= 3 * n
    assert metrics["vllm:num_requests_running"] == 0
    assert "vllm:kv_cache_usage_perc" in metrics


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
def test_the_readme_command_serves_through_vllm(tmp_path):
    """`monet serve` with no options: the bundled default model on the vLLM engine, the
    embedded local store, no keys; ready, vLLM's metrics on /metrics, a masked generation."""
    proc = ServerProcess(tmp_path, args=[], env={k: "" for k in os.environ
                                                 if k.startswith("MONET_")})
    proc.env.pop("MONET_ENGINE")  # the default: vLLM when installed
    proc.env.pop("MONET_THREADS")  # the test servers' runtime setting, which vLLM refuses
    proc.env["MONET_STORE_DIR"] = str(tmp_path / "store")
    start = time.monotonic()
    proc.start(timeout=600)
    try:
        with client(proc, None) as c:
            while (ready := c.get("/ready")).status_code != 200:
                assert time.monotonic() - start < 600, ready.text
                time.sleep(0.2)
            started = time.monotonic() - start
            listening = [l for l in proc.log_lines() if l.get("msg") == "listening"]
            assert listening[0]["engine"] == "VllmEngine"
            assert "vllm:num_requests_running" in c.get("/metrics").text
            name = unique("readme")
            layers = [{"layer": 0, "experts": [[i, j] for i in range(8) for j in range(8)]}]
            r = c.put(f"/masks/{name}", json={"kind": "manual", "layers": layers})
            assert r.status_code == 201, r.text
            r = c.post("/generate", json={"prompt": "def ", "max_tokens": 8, "temperature": 0,
                                          "mask_profile": name})
            assert r.status_code == 200, r.text
            assert r.headers["x-monet-mask-profiles"] == f"{name}@1"
            assert len(r.json()["token_ids"]) == 8
    finally:
        assert proc.stop() == 0  # drained, then a clean exit
    print(f"monet serve (vLLM, default model) ready after {started:.1f} s")


@pytest.mark.slow
def test_a_poisoned_request_fails_no_one_on_vllm(vllm_server):
    from test_isolation import check_poisoned_batch

    with client(vllm_server) as c:
        check_poisoned_batch(c)
        # a value the API takes and vLLM refuses (temperature above 2) is that request's 400
        r = c.post("/generate", json={"prompt_token_ids": [1, 2], "max_tokens": 4,
                                      "temperature": 3.0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text


@pytest.mark.slow
def test_scores_agree_with_the_runtime_engine(vllm_server, server, fixture_mask, golden):
    """One echo + logprobs request, unmasked and with a profile named through `model`, on the
    vLLM server and on the main test server (the runtime engine, the same checkpoint): the same
    tokens, their logprobs within 1e-3 (measured: below 1e-5 here)."""
    prompt = golden["input_ids"][0].tolist()
    name = unique("vlp")
    answers = {}
    for proc in (vllm_server, server):
        with client(proc, ADMIN_KEY) as c:
            assert c.put(f"/masks/{name}", json={"layers": fixture_mask["layers"]}
                         ).status_code == 201
            base = c.get("/v1/models").json()["data"][0]["id"]
            for model in (base, name):
                r = c.post("/v1/completions", json={
                    "model": model, "prompt": prompt, "echo": True, "max_tokens": 4,
                    "temperature": 0, "logprobs": 2, "ignore_eos": True, "n": 2})
                assert r.status_code == 200, r.text
                answers[proc.url, model == name] = [c["logprobs"] for c in r.json()["choices"]]
    worst = 0.0
    for masked in (False, True):
        got, want = answers[vllm_server.url, masked], answers[server.url, masked]
        for a, b in zip(got, want, strict=True):
            assert a["tokens"] == b["tokens"] and a["token_logprobs"][0] is None
            worst = max(worst, *(abs(x - y) for x, y in zip(a["token_logprobs"][1:],
                                                             b["token_logprobs"][1:])))
    assert worst < 1e-3
    assert answers[server.url, True] != answers[server.url, False]
    print(f"vLLM against the runtime engine: logprobs differ by at most {worst:.2e}")


@pytest.mark.slow
def test_engine_settings_reach_vllm(vllm_server):
    """The server runs with --max-model-len 128 --mask-slots 3 --max-batch-size 8 (last in
    this module: it adds to the counts test_masked_generation_on_vllm reads)."""
    with client(vllm_server) as c:
        health = c.get("/ready").json()["checks"]["engine_health"]
        assert health["engine"] == "vllm"
        assert (health["max_model_len"], health["mask_slots"], health["max_num_seqs"]) == (
            128, 3, 8)
        assert c.get("/v1/models").json()["data"][0]["max_model_len"] == 128
        # the model has 256 positions; the engine takes 128
        r = c.post("/generate", json={"prompt_token_ids": [5] * 100, "max_tokens": 40})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        r = c.post("/generate", json={"prompt_token_ids": [5] * 100, "max_tokens": 28,
                                      "ignore_eos": True})
        assert r.status_code == 200 and len(r.json()["token_ids"]) == 28, r.text
