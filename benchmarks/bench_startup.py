"""Start-up time of `monet serve`: from process start to the first 200 from /ready.

Runs the README's command (`monet serve`, no options: the bundled default model, vLLM where
installed, an embedded store in a temp dir) --runs times, one after another, and reports each
run's phases from its "listening" log line: the process up to the engine (Python, the CLI, the
server's modules), the engine (`import vllm`, the model, vLLM's engine core, tcmalloc), the
store and the app, then uvicorn until /ready answers 200. `import vllm` alone is timed in a
fresh interpreter, to split the engine's share. A first, uncounted start fills the caches a
new install lacks (Python's bytecode where it may write it, Numba's, vLLM's model info); the
median of the counted runs is the figure.

    .venv/bin/python benchmarks/bench_startup.py --runs 3 [--engine runtime]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_vllm_s() -> float:
    code = "import time; t = time.perf_counter(); import vllm; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, cwd=ROOT).stdout.split()[-1])


def one_start(engine: str, tmp: Path) -> dict[str, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONET_")}
    env.update(MONET_STORE_DIR=str(tmp / f"store-{port}"), MONET_ENGINE=engine)
    log = tmp / f"serve-{port}.log"
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "monet_cli.main", "serve", "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"monet serve exited {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        ready = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    lines = [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{")]
    listening = next(l for l in lines if l.get("msg") == "listening")
    return {"ready": ready, "engine": listening["engine_s"], "app": listening["app_s"],
            "class": listening["engine"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engine", choices=["auto", "vllm", "runtime"], default="auto")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        first = one_start(args.engine, Path(tmp))
        print(f"first start (caches): /ready after {first['ready']:.1f} s", flush=True)
        for n in range(args.runs):
            r = one_start(args.engine, Path(tmp))
            r["before"] = r["ready"] - r["engine"] - r["app"]  # Python, imports; uvicorn
            runs.append(r)
            print(f"run {n + 1}: {r['class']}: /ready after {r['ready']:.1f} s (engine "
                  f"{r['engine']:.1f} s, store + app {r['app']:.1f} s, the rest "
                  f"{r['before']:.1f} s: interpreter, CLI imports, uvicorn)", flush=True)
    median = sorted(runs, key=lambda r: r["ready"])[len(runs) // 2]
    line = (f"median: /ready after {median['ready']:.1f} s; engine {median['engine']:.1f} s, "
            f"store + app {median['app']:.1f} s, the rest {median['before']:.1f} s")
    if median["class"] == "VllmEngine":
        imports = statistics.median(import_vllm_s() for _ in range(3))
        line += f"; `import vllm` alone {imports:.1f} s (of the engine's share)"
    print(line)


if __name__ == "__main__":
    main()
