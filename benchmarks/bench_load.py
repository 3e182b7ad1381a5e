"""Load test of the HTTP service: N concurrent clients on loopback for a fixed time.

Each client loops: POST /generate (streamed, so time to first token is measured too) with a
fixed output length, eos ignored, its own mask profile or none, until the time is up. The
client is bounded: one connection and one request at a time per client. Reports requests,
errors (anything but 200 and a complete stream), request latency p50 / p90 / p99, time to
first token p50 / p99, and output tokens/s over the wall time. Exit status 1 on any error.

    .venv/bin/python benchmarks/bench_load.py --clients 16 --duration 20
    .venv/bin/python benchmarks/bench_load.py --url http://127.0.0.1:8000 --key KEY

Without --url it starts `monet serve` itself (fixture model unless --model, embedded local
store in a temp dir, no keys, localhost) and stops it after. Limits, for scale: on CPU a tiny
model's decode step is Python overhead bound (the runtime engine batches the waiting
requests into one step); the server adds JSON and SSE per token. Latency grows with the
clients once a batch is full: p50 ~= queueing + batch duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "monet-vd-tiny" / "model"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Stats:
    def __init__(self):
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.tokens = 0
        self.errors: list[str] = []


async def client_loop(http: httpx.AsyncClient, body: dict, deadline: float, stats: Stats,
                      stop: asyncio.Event | None = None):
    while time.perf_counter() < deadline and not (stop and stop.is_set()):
        start = time.perf_counter()
        first, tokens, done = None, 0, False
        try:
            async with http.stream("POST", "/generate", json=body) as r:
                if r.status_code != 200:
                    stats.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        stats.errors.append(f"stream error: {chunk['error']['message']}")
                        break
                    if first is None and chunk["token_ids"]:
                        first = time.perf_counter()
                    tokens += len(chunk["token_ids"])
        except httpx.HTTPError as e:
            stats.errors.append(f"{type(e).__name__}: {e}")
            continue
        if not done or tokens != body["max_tokens"]:
            stats.errors.append(f"incomplete stream ({tokens} tokens, done={done})")
            continue
        stats.latency.append(time.perf_counter() - start)
        stats.ttft.append(first - start)
        stats.tokens += tokens


async def run(url: str, key: str | None, *, clients: int, duration: float, max_tokens: int,
              profiles: list[str | None], stop: asyncio.Event | None = None
              ) -> tuple[Stats, float]:
    """stop: when set, the clients end after their request in flight (else at `duration`)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    stats = Stats()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120,
                                 limits=limits) as http:
        # warm-up: one request, not counted
        await http.post("/generate", json={"prompt": "warm", "max_tokens": 2})
        start = time.perf_counter()
        deadline = start + duration
        bodies = [{"prompt": f"client {n} says hello", "max_tokens": max_tokens,
                   "temperature": 0.8, "seed": n, "ignore_eos": True, "stream": True,
                   "mask_profile": profiles[n % len(profiles)]} for n in range(clients)]
        await asyncio.gather(*(client_loop(http, b, deadline, stats, stop) for b in bodies))
        wall = time.perf_counter() - start
    return stats, wall


def start_server(model: Path, clients: int, tmp: Path,
                 engine: str = "runtime") -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MONET_API_KEYS": "", "MONET_ADMIN_KEYS": "",
           "MONET_MAX_CONCURRENT_REQUESTS": str(max(64, 2 * clients)),
           "MONET_MAX_BATCH_SIZE": str(min(32, clients))}
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "monet_cli.main", "serve", "--model",
                             str(model), "--port", str(port), "--store-dir", str(tmp / "masks"),
                             "--engine", engine], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{(tmp / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def make_profiles(url: str, key: str | None, count: int) -> list[str | None]:
    """`count` profiles removing random experts (plus None: some clients unmasked)."""
    import random

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    info = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]
    E = 16 if "tiny" in info["id"] else 64
    names: list[str | None] = [None]
    for n in range(count):
        rng = random.Random(n)
        layers = [{"layer": l, "experts": [[rng.randrange(E), rng.randrange(E)]
                                           for _ in range(E * E // 10)]} for l in range(4)]
        name = f"bench-{n}"
        r = httpx.put(f"{url}/masks/{name}", json={"layers": layers}, headers=headers)
        if r.status_code in (200, 201):
            names.append(name)
    return names


def build_records(count: int, seed: int = 0) -> list[dict]:
    """Labelled texts for a mask build (two labels of random words), ~100 tokens each."""
    import random

    rng = random.Random(seed)
    words = {"a": ["alpha", "beta", "gamma", "delta"], "b": ["red", "green", "blue", "cyan"]}
    return [{"text": " ".join(rng.choice(words[label]) for _ in range(40)), "label": label}
            for label in ("a", "b") for _ in range(count // 2)]


async def during_builds(url: str, key: str | None, args, profiles) -> int:
    """Serving throughput alone and while a mask build job runs in the same server,
    interleaved (alone, build, alone, build, ...); each build phase lasts as long as its job."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"kind": "domain", "criterion": "specificity", "target": "a",
            "records": build_records(args.build_records), "max_length": 512}
    alone, built = [], []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        for rep in range(args.repeat):
            stats, wall = await run(url, key, clients=args.clients, duration=args.duration,
                                    max_tokens=args.max_tokens, profiles=profiles)
            alone.append(stats.tokens / wall)
            r = await http.post(f"/masks/bench-build-{rep}/build", json=body)
            r.raise_for_status()
            job = r.json()["id"]
            start, stop = time.perf_counter(), asyncio.Event()
            task = asyncio.create_task(run(url, key, clients=args.clients, duration=3600,
                                           max_tokens=args.max_tokens, profiles=profiles,
                                           stop=stop))
            while (await http.get(f"/jobs/{job}")).json()["status"] in ("queued", "running"):
                await asyncio.sleep(0.2)
            took = time.perf_counter() - start
            stop.set()
            stats, wall = await task
            built.append(stats.tokens / wall)
            print(f"round {rep + 1}: alone {alone[-1]:.0f} tok/s; during a {took:.1f} s build "
                  f"{built[-1]:.0f} tok/s ({built[-1] / alone[-1]:.2f}x)", flush=True)
    a, b = statistics.median(alone), statistics.median(built)
    print(f"median: alone {a:.0f} tok/s, during a build {b:.0f} tok/s: {b / a:.2f}x")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--key", help="API key for --url")
    ap.add_argument("--model", type=Path, default=FIXTURE)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--profiles", type=int, default=3, help="mask profiles used by clients")
    ap.add_argument("--engine", choices=["runtime", "vllm"], default="runtime")
    ap.add_argument("--during-build", action="store_true",
                    help="throughput alone and while a mask build runs in the same server")
    ap.add_argument("--build-records", type=int, default=400, help="texts per build")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (--during-build)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        url = args.url
        if url is None:
            proc, url = start_server(args.model, args.clients, Path(tmp), args.engine)
        try:
            profiles = make_profiles(url, args.key, args.profiles) if args.profiles else [None]
            if args.during_build:
                print(f"machine: {platform.node()} {os.cpu_count()} cpus; {args.engine} engine,"
                      f" {args.clients} clients, {args.max_tokens} tokens per request")
                return asyncio.run(during_builds(url, args.key, args, profiles))
            stats, wall = asyncio.run(run(url, args.key, clients=args.clients,
                                          duration=args.duration, max_tokens=args.max_tokens,
                                          profiles=profiles))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)

    n = len(stats.latency)
    model_name = args.model.parent.name if args.model.name == "model" else args.model.name
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"python {platform.python_version()}; server {url} "
          f"({'started here, ' + model_name if args.url is None else 'given'})")
    print(f"load: {args.clients} clients x {args.duration:.0f} s, {args.max_tokens} tokens per "
          f"request (streamed), profiles {profiles}")
    print(f"requests {n}  errors {len(stats.errors)}  ({n / wall:.1f} req/s, "
          f"{stats.tokens / wall:.0f} output tok/s)")
    if n:
        print(f"latency  p50 {1e3 * percentile(stats.latency, 50):8.1f} ms   "
              f"p90 {1e3 * percentile(stats.latency, 90):8.1f} ms   "
              f"p99 {1e3 * percentile(stats.latency, 99):8.1f} ms   "
              f"mean {1e3 * statistics.mean(stats.latency):8.1f} ms")
        print(f"TTFT     p50 {1e3 * percentile(stats.ttft, 50):8.1f} ms   "
              f"p99 {1e3 * percentile(stats.ttft, 99):8.1f} ms")
    for error in stats.errors[:10]:
        print("error:", error)
    return 1 if stats.errors or not n else 0


if __name__ == "__main__":
    sys.exit(main())
