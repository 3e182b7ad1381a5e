"""Prometheus metrics, `monet_` prefix, with the meanings of vLLM's `vllm:` metrics where one
exists (time to first token, inter-token latency, end-to-end latency, queue time, running and
waiting requests, prompt and generation tokens), plus the mask store and profile cache; and
the engine's own metrics (vLLM's `vllm:` ones) next to them.

Each app has its own registry, so that several apps may live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# vLLM's buckets for these histograms
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
         7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
        10.0, 20.0, 40.0, 80.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_STORE = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _EngineMetrics(Collector):
    def __init__(self, families: Callable[[], Iterable[Metric]]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "monet_requests", "Generation requests by endpoint, mask profiles and HTTP status.",
            ["endpoint", "profile", "status"], registry=r)
        self.request_success = Counter(
            "monet_request_success", "Finished generations by finish reason.",
            ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("monet_prompt_tokens", "Prefill tokens processed.",
                                     registry=r)
        self.generation_tokens = Counter("monet_generation_tokens", "Tokens generated.",
                                         registry=r)
        self.ttft = Histogram("monet_time_to_first_token_seconds",
                              "Time from arrival to the first generated token.",
                              buckets=_TTFT, registry=r)
        self.itl = Histogram("monet_inter_token_latency_seconds",
                             "Time between consecutive generated tokens.", buckets=_ITL,
                             registry=r)
        self.e2e = Histogram("monet_e2e_request_latency_seconds",
                             "Time from arrival to the last generated token.", buckets=_E2E,
                             registry=r)
        self.queue_time = Histogram("monet_request_queue_time_seconds",
                                    "Time a request waited in the engine before running.",
                                    buckets=_TTFT, registry=r)
        self.running = Gauge("monet_num_requests_running", "Requests in the running batch.",
                             registry=r)
        self.waiting = Gauge("monet_num_requests_waiting", "Requests waiting for the engine.",
                             registry=r)
        self.in_flight = Gauge("monet_num_requests_in_flight",
                               "Generation requests admitted by the server.", registry=r)
        self.rejected = Counter("monet_requests_rejected",
                                "Requests refused by a limit (overload, size).", ["reason"],
                                registry=r)
        self.store_latency = Histogram("monet_mask_store_latency_seconds",
                                       "Mask store operations, by operation.", ["operation"],
                                       buckets=_STORE, registry=r)
        self.store_errors = Counter("monet_mask_store_errors",
                                    "Mask store operations that failed (unreachable, error).",
                                    ["operation"], registry=r)
        self.cache_hits = Counter("monet_mask_cache_hits",
                                  "Profile lookups served from the replica's cache.", registry=r)
        self.cache_misses = Counter("monet_mask_cache_misses",
                                    "Profile lookups that read the store.", registry=r)
        self.cache_size = Gauge("monet_mask_cache_size", "Profiles held in the replica's cache.",
                                registry=r)
        self.profile_version = Gauge("monet_mask_profile_version",
                                     "Current version of each stored mask profile.", ["profile"],
                                     registry=r)
        self.store_up = Gauge("monet_mask_store_up",
                              "1 when the mask store answered its last check.", registry=r)

    def watch_engine(self, load: Callable[[], tuple[int, int]],
                     metric_families: Callable[[], Iterable[Metric]]) -> None:
        """Running and waiting from the engine's load; its own metrics served next to ours."""
        self.running.set_function(lambda: load()[0])
        self.waiting.set_function(lambda: load()[1])
        self.registry.register(_EngineMetrics(metric_families))

    def set_versions(self, versions: dict[str, int]) -> None:
        """Replace the per-profile versions with the store's current list."""
        self.profile_version.clear()
        for name, version in versions.items():
            self.profile_version.labels(name).set(version)

    def render(self) -> bytes:
        return generate_latest(self.registry)
