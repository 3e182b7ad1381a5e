"""Run the vLLM integration tests in .venv-vllm when this interpreter has no vLLM.

vLLM pins its own dependencies, so it lives in its own virtualenv (scripts/setup.sh makes it);
this keeps `.venv/bin/python -m pytest` (the CI command) covering the vLLM path.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vLLM importable here: test_vllm_engine.py runs directly")
def test_vllm_engine_in_its_venv():
    if not VLLM_PYTHON.exists():
        pytest.skip(f"{VLLM_PYTHON} missing (scripts/setup.sh installs it)")
    result = subprocess.run(
        [str(VLLM_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "monet_runtime" / "test_vllm_engine.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    tail = "\n".join(result.stdout.splitlines()[-30:])
    assert result.returncode == 0, f"vLLM tests failed:\n{tail}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout, tail
