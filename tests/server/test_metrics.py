"""GET /metrics parsed with prometheus_client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from server_support import client, unique


def scrape(server) -> dict[str, dict]:
    with client(server) as c:
        text = c.get("/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def family(name: str) -> str:
    return name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")


def value(families, name: str, **labels) -> float:
    if family(name) not in families:
        return 0.0
    return sum(s.value for s in families[family(name)].samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics(server, gen, admin):
    name = unique("metr")
    admin.put(f"/masks/{name}", json={"layers": [{"layer": 0, "experts": [[0, 1]]}]})
    before = scrape(server)
    for _ in range(3):
        r = gen.post("/generate", json={"prompt": "abc", "max_tokens": 4, "mask_profile": name,
                                        "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
    assert gen.post("/generate", json={"prompt": "x", "mask_profile": "missing-x"}
                    ).status_code == 404
    after = scrape(server)

    def delta(metric, **labels):
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert delta("monet_requests_total", endpoint="generate", profile=name, status="200") == 3
    assert delta("monet_requests_total", endpoint="generate", profile="unknown",
                 status="404") == 1  # unresolved names are not label values
    assert value(after, "monet_requests_total", profile="missing-x") == 0
    assert delta("monet_prompt_tokens_total") == 3 * 4
    assert delta("monet_generation_tokens_total") == 3 * 4
    assert delta("monet_request_success_total", finished_reason="length") == 3
    for histogram in ("monet_time_to_first_token_seconds", "monet_e2e_request_latency_seconds",
                      "monet_request_queue_time_seconds"):
        assert delta(f"{histogram}_count") == 3, histogram
    assert delta("monet_inter_token_latency_seconds_count") == 3 * 3
    assert value(after, "monet_num_requests_running") == 0
    assert value(after, "monet_num_requests_waiting") == 0
    assert value(after, "monet_mask_profile_version", profile=name) == 1
    assert delta("monet_mask_cache_hits_total") >= 2
    assert value(after, "monet_mask_cache_misses_total") >= 1
    assert value(after, "monet_mask_cache_size") >= 1
    assert value(after, "monet_mask_store_latency_seconds_count", operation="get") >= 1
    assert "monet_mask_store_errors" in after
    assert value(after, "monet_mask_store_up") == 1
    assert all(n.startswith("monet_") for n in after if not n.startswith(("python_", "process_")))
