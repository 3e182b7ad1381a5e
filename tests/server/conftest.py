"""Fixtures for the server tests: a real Redis and real `monet serve` processes over HTTP.
Servers load a model, so they are session-scoped and few."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from server_support import (
    ADMIN_KEY,
    KEYS_ENV,
    REDIS_SERVER,
    TINY,
    RedisProcess,
    ServerProcess,
    client,
)

@pytest.fixture(scope="session")
def tiny() -> Path:
    if not TINY.exists():
        pytest.fail(f"fixtures missing: {TINY}")
    return TINY


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed")
    server = RedisProcess(tmp_path_factory.mktemp("redis"), persist=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def namespace() -> str:
    return f"test:{uuid.uuid4().hex[:10]}"


def _main_env(namespace: str) -> dict[str, str]:
    return {**KEYS_ENV, "MONET_STORE_NAMESPACE": namespace, "MONET_MAX_TOKENS": "128",
            "MONET_MAX_PROMPT_TOKENS": "200", "MONET_MAX_BODY_BYTES": str(1 << 20),
            "MONET_MASK_STALENESS_S": "5", "MONET_SERVED_MODEL_NAME": "monet-vd-tiny"}


@pytest.fixture(scope="session")
def server(tmp_path_factory, redis_server, namespace, tiny):
    """The main server: fixture model, shared Redis, API keys."""
    proc = ServerProcess(tmp_path_factory.mktemp("main"), env=_main_env(namespace),
                         args=["--model", str(tiny / "model"), "--redis-url", redis_server.url])
    yield proc.start()
    proc.stop()


@pytest.fixture(scope="session")
def replica(tmp_path_factory, redis_server, namespace, tiny, server):
    """A second server process sharing the main server's Redis store."""
    proc = ServerProcess(tmp_path_factory.mktemp("replica"), env=_main_env(namespace),
                         args=["--model", str(tiny / "model"), "--redis-url", redis_server.url])
    yield proc.start()
    proc.stop()


@pytest.fixture
def gen(server):
    with client(server) as c:
        yield c


@pytest.fixture
def admin(server):
    with client(server, ADMIN_KEY) as c:
        yield c


@pytest.fixture(scope="session")
def fixture_mask(tiny) -> dict:
    return json.loads((tiny / "mask.json").read_text())


@pytest.fixture(scope="session")
def golden(tiny) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(tiny / "golden.safetensors"))
