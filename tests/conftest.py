from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TINY = FIXTURES / "monet-vd-tiny"


@pytest.fixture(scope="session")
def tiny_fixture() -> Path:
    if not TINY.exists():
        pytest.fail(f"fixtures missing: {TINY} (the shared/ folder must sit beside the checkout)")
    return TINY
