"""Fixtures for the mask tests: a real redis-server on a free port, stores, tiny models."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from redis_support import REDIS_SERVER, RedisProcess


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed")
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server this test may stop and restart."""
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from monet_runtime.testing import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=3)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    import torch

    from monet_runtime import load_model

    torch.manual_seed(0)
    return load_model(tiny_checkpoint, dtype=torch.float32, device="cpu")


def build_profile(name: str = "p", *, seed: int = 0, density: float = 0.1,
                  num_layers: int = 4, num_experts: int = 16, description: str = "",
                  model_id: str = "monet-test", kind: str = "manual"):
    import numpy as np

    from masks.schema import MaskProfile, Provenance
    from monet_runtime import ExpertMask

    rng = np.random.default_rng(seed)
    E = num_experts
    layers = {l: np.argwhere(rng.random((E, E)) < density) for l in range(num_layers)}
    return MaskProfile(
        name=name, description=description, kind=kind, model_id=model_id,
        num_layers=num_layers, num_experts=E, experts=ExpertMask(layers, num_experts=E),
        provenance=Provenance(builder="test", criterion="manual"),
    )


@pytest.fixture
def make_profile():
    return build_profile
