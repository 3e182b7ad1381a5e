"""kernels.linear: the compiled matrix-vector loops for decode steps against float64 products
and F.linear, odd shapes, one thread and the split rows, and when they are (not) taken."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import gemv_cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,N,D", [(1, 1, 1), (1, 7, 33), (3, 255, 17), (2, 256, 64),
                                   (5, 1001, 130), (16, 300, 96)])
def test_gemv_matches_float64(dtype, T, N, D):
    g = torch.Generator().manual_seed(T * 1000 + N + D)
    x = torch.randn(T, D, generator=g).to(dtype)
    W = torch.randn(N, D, generator=g).to(dtype)
    got = gemv_cpu.gemv(x, W)
    assert got.dtype == torch.float32 and got.shape == (T, N)
    want = x.double() @ W.double().t()
    scale = x.double().abs() @ W.double().abs().t()  # the sum of |terms|: float32 rounding
    assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_takes_the_loops_for_few_tokens_only(dtype, monkeypatch):
    calls = []
    real = gemv_cpu.gemv
    monkeypatch.setattr(gemv_cpu, "gemv", lambda x, W: calls.append(x.shape) or real(x, W))
    W = torch.randn(300, 64).to(dtype)
    tokens = kernels.gemv_max_tokens(dtype)  # the most this CPU's measured limit takes
    x = torch.randn(max(tokens, 1), 1, 64).to(dtype)
    out = kernels.linear(x, W)
    loops = [(tokens, 64)] if tokens else []  # 0: bfloat16 on AMX, where torch's wins
    assert calls == loops and out.dtype == dtype and out.shape == (max(tokens, 1), 1, 300)
    ref = F.linear(x.double(), W.double()).to(dtype)  # rounded as F.linear's result
    assert (out.float() - ref.float()).abs().max() <= 2 * ref.float().abs().max() * 2**-8
    many = torch.randn(2, tokens + 1, 64).to(dtype)
    got = kernels.linear(many, W)
    assert got.shape == (2, tokens + 1, 300) and got.dtype == dtype and calls == loops
    if dtype == torch.bfloat16:
        assert torch.equal(got, F.linear(many, W))
    else:  # oneDNN's product where it is built in, else F.linear
        want = F.linear(many.double(), W.double())
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    strided = W.t().contiguous().t()
    assert torch.equal(kernels.linear(x, strided), F.linear(x, strided)) and calls == loops
    assert torch.equal(kernels.linear(x.float().to(torch.float64), W.double()),
                       F.linear(x.double(), W.double()))
    leaf = W.clone().requires_grad_(True)
    y = kernels.linear(x, leaf)  # autograd: F.linear, whose gradient flows
    y.sum().backward()
    assert leaf.grad is not None and calls == loops
