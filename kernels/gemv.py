"""Bias-free linear layers for decode steps: x W^T as F.linear, steps of few tokens on the CPU
through compiled matrix-vector loops (kernels.gemv_cpu), everything else through F.linear."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["gemv_max_tokens", "linear"]


@functools.cache
def _native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16), where oneDNN's
    products are fast; without, torch widens bfloat16 element by element."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in (
        "_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def gemv_max_tokens(dtype: torch.dtype) -> int:
    """Steps of up to this many tokens take the loops. Measured on an AVX2 CPU (2 cores, one
    [4608, 1536] weight, cold; benchmarks/bench_release.py), F.linear / loops: float32 1.5x at
    1 token, 1.8x at 8, 1.25x at 16, 0.97x at 32; bfloat16 1.15x at 1, 2.7x at 8, 3.2x at 32,
    2.8x at 512 (torch's bfloat16 product widens element-wise there). Where bfloat16 is native
    the loops measured level with torch at one token and are not taken beyond."""
    if dtype == torch.float32:
        return 16
    if dtype == torch.bfloat16:
        return 1 if _native_bf16() else 512
    return 0


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x [..., D] and weight [N, D], in x's dtype. On the CPU, outside
    autograd, with a contiguous float32 or bfloat16 weight of x's dtype and at most
    gemv_max_tokens tokens: compiled loops that read each weight row once per step (float32
    accumulation, rounded to x's dtype as F.linear's result is)."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (0 < tokens <= gemv_max_tokens(weight.dtype) and x.dtype == weight.dtype
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.is_contiguous() and not (torch.is_grad_enabled() and (
                x.requires_grad or weight.requires_grad))):
        from kernels import gemv_cpu

        out = gemv_cpu.gemv(x.reshape(tokens, x.shape[-1]), weight)
        return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)
