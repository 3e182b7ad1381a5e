"""kernels.prepare: the CPU loops compiled before any request (the engines call it; that no
generation compiles more after it is tested in tests/monet_runtime/test_engine.py)."""

import pytest
import torch

import kernels


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float32])
def test_prepare_runs_under_any_default_dtype(default):
    """vLLM builds its model (which calls kernels.prepare) under the model's dtype as torch's
    default: prepare's own tensors say their dtypes."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            kernels.prepare("cpu", dtype, sparse=True)
    finally:
        torch.set_default_dtype(before)
