"""Kernel tests run the Triton kernels on CUDA, or on the CPU under TRITON_INTERPRET=1."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of kernels.*_triton: triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels run: CUDA, else the CPU through the Triton interpreter."""
    from kernels import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    return torch.device("cpu")
