"""Latency of the atlas API over HTTP: GET /experts/{layer}/{i}/{j}, GET /experts/search by
label (every label, pages 1-3) and by text (64 characters of a corpus text), one request at a
time on loopback, p50 / p99 per endpoint after a warm-up (the first request loads the atlas).

    .venv/bin/python benchmarks/bench_atlas.py --atlas atlas.bin     # from `monet atlas build
                                                                    #  ... --out atlas.bin`
    .venv/bin/python benchmarks/bench_atlas.py --url http://127.0.0.1:8000 --key KEY

Without --url it starts `monet serve` (the default model unless --model, runtime engine, a
temporary local store holding --atlas, no keys). What bounds it: an entry is a lookup of N
contexts and M tokens plus the store's digest read; a text search routes the text through the
model (engine.routing) and ranks R * E^2 experts in numpy; a label search ranks once per label
(the first page), then slices.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import percentile, start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "monet_runtime" / "default_model"


def timed(http: httpx.Client, path: str, params: dict | None = None) -> float:
    start = time.perf_counter()
    r = http.get(path, params=params)
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise SystemExit(f"GET {path} {params}: {r.status_code} {r.text[:300]}")
    return elapsed


def run(url: str, key: str | None, requests: int, texts: list[str]) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    rng = random.Random(0)
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        probe = http.get("/experts")
        if probe.status_code != 200:
            raise SystemExit(f"no atlas: {probe.status_code} {probe.text[:300]}")
        atlas = probe.json()
        labels, E = atlas["labels"], atlas["num_experts"]
        layers = list(range(atlas["num_layers"]))
        cases = {
            "GET /experts/{layer}/{i}/{j}": lambda: (
                f"/experts/{rng.choice(layers)}/{rng.randrange(E)}/{rng.randrange(E)}", None),
            "GET /experts/search?label=": lambda: (
                "/experts/search", {"label": rng.choice(labels), "offset": 20 * rng.randrange(3)}),
            "GET /experts/search?q=": lambda: (
                "/experts/search", {"q": rng.choice(texts)}),
        }
        print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
              f"python {platform.python_version()}; {requests} requests per endpoint, "
              f"one at a time; load average {os.getloadavg()[0]:.1f}")
        for name, make in cases.items():
            for _ in range(5):  # warm-up: the label rankings, the engine
                timed(http, *make())
            times = sorted(timed(http, *make()) for _ in range(requests))
            print(f"{name:32s} p50 {1e3 * percentile(times, 50):6.1f} ms   "
                  f"p99 {1e3 * percentile(times, 99):6.1f} ms   max {1e3 * times[-1]:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--key")
    parser.add_argument("--atlas", type=Path, help="An atlas file (monet atlas build --out).")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--corpus", type=Path, help="JSONL: texts for the text searches.")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    texts = ["def main(argv):\n    import os, sys\n    return 0\n",
             "The function returns the number of elements in the list.",
             "#include <stdio.h>\nint main(void) { printf(\"hi\"); }",
             "my $self = shift; return $self->{name};",
             "const x = require('fs'); module.exports = function () {};"]
    if args.corpus:
        import json

        lines = args.corpus.read_text().splitlines()[:50]
        texts = [json.loads(line)["text"][:64] for line in lines if line.strip()]
    if args.url:
        run(args.url, args.key, args.requests, texts)
        return
    if args.atlas is None:
        raise SystemExit("give --url, or --atlas to serve one")
    from masks.atlas import Atlas, atlas_name
    from masks.local_store import LocalMaskStore

    with tempfile.TemporaryDirectory() as tmp:
        data = args.atlas.read_bytes()
        store = LocalMaskStore(Path(tmp) / "masks")
        store.put_artifact(atlas_name(Atlas.from_bytes(data).model_id), data)
        store.close()
        proc, url = start_server(args.model, 1, Path(tmp))
        try:
            run(url, None, args.requests, texts)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
