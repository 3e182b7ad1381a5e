from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TINY = FIXTURES / "monet-vd-tiny"


@pytest.fixture(scope="session")
def tiny_fixture() -> Path:
    if not TINY.exists():
        pytest.fail(f"fixtures missing: {TINY} (the shared/ folder must sit beside the checkout)")
    return TINY


def pytest_collection_modifyitems(config, items):
    """The in-process vLLM engine tests (and the engine contract, which runs over vLLM too)
    run last: vLLM's CPU engine core runs inside the test process and leaves it changed (its
    own OpenMP runtime, intel-openmp, and thread settings). Run in the middle of the suite,
    the in-process training tests after it (the language masks, 10-14 minutes alone) had not
    finished after 26 minutes."""
    last = ("tests/monet_runtime/test_engine_contract.py",
            "tests/monet_runtime/test_vllm_engine.py")
    items.sort(key=lambda item: item.nodeid.startswith(last))
