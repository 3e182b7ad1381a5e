"""Real processes for the server tests and benchmarks: redis-server on a free port in a temp
dir (never the system Redis) and `monet serve` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from redis_support import REDIS_SERVER, RedisProcess, free_port  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT.parent / "shared" / "fixtures" / "monet-vd-tiny"
GEN_KEY, ADMIN_KEY = "gen-key-0001", "admin-key-0001"
KEYS_ENV = {"MONET_API_KEYS": f"tester:{GEN_KEY}", "MONET_ADMIN_KEYS": f"root:{ADMIN_KEY}"}


class ServerProcess:
    """`monet serve` in a subprocess; its JSON log lines land in `log_path`."""

    def __init__(self, tmp: Path, *, args: list[str], env: dict[str, str], host="127.0.0.1"):
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        self.args = ["--port", str(self.port), *args]
        # The runtime engine unless a test asks for vLLM (--engine vllm; `monet serve`'s own
        # default is vLLM where it is installed).
        self.env = {**os.environ, "MONET_STORE_DIR": str(tmp / "store"), "MONET_THREADS": "1",
                    "MONET_ENGINE": "runtime", **env}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> ServerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "monet_cli.main", "serve", *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict]:
        lines = []
        for line in self.log().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return lines

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


def client(server: ServerProcess, key: str | None = GEN_KEY, **kwargs) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60, **kwargs)



def unique(prefix: str = "p") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def poisoned_batch(c: httpx.Client, *, innocents: list[dict], culprit: dict,
                   blocker: dict) -> tuple[list[httpx.Response], httpx.Response]:
    """POST /generate for the innocents and the culprit at once, while `blocker` runs, so that
    they queue together and run as one batch: (the innocents' responses, the culprit's)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(innocents) + 2) as pool:
        running = pool.submit(c.post, "/generate", json=blocker)
        time.sleep(0.5)  # the blocker has its batch; the rest wait for the next one
        futures = [pool.submit(c.post, "/generate", json=body) for body in [*innocents, culprit]]
        responses = [f.result() for f in futures]
        assert running.result().status_code == 200
    return responses[:-1], responses[-1]


def finished(c: httpx.Client, job: dict, timeout: float = 120) -> dict:
    """The job (POST .../build's answer) polled at /jobs/{id} until it is neither queued nor
    running, or `timeout` seconds passed (the caller asserts its status)."""
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = c.get(f"/jobs/{job['id']}").json()
    return job
