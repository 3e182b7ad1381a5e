"""Bias-free linear layers for decode steps: x W^T as F.linear, steps of few tokens on the CPU
through compiled matrix-vector loops (kernels.gemv_cpu), everything else through F.linear."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["gemv_max_tokens", "linear"]


@functools.cache
def _bf16_products() -> str:
    """How this CPU multiplies bfloat16: "amx" (tiles), "avx512" (AVX512-BF16 dot products)
    or "widened" (neither: torch widens element by element)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512"
    return "widened"


# bfloat16 steps of up to this many tokens take the loops, per kind of bfloat16 product.
_BF16_MAX_TOKENS = {"amx": 1, "avx512": 2, "widened": 512}


def gemv_max_tokens(dtype: torch.dtype) -> int:
    """Steps of up to this many tokens take the loops. Measured on 2-core CPUs, one [4608,
    1536] weight, cold (24 in turn), F.linear / loops: AVX2 float32 1.5x at 1 token, 1.8x at
    8, 1.25x at 16, 0.97x at 32; bfloat16 1.15x at 1, 2.7x at 8, 3.2x at 32, 2.8x at 512
    (torch widens bfloat16 element-wise there). AVX512-BF16 (no AMX): float32 2.3x at 1, 1.7x
    at 8, 1.3x at 16, 1.1x at 32; bfloat16 1.7x at 1, 1.3x at 2, 0.65x at 4. AMX: bfloat16
    level at one token."""
    if dtype == torch.float32:
        return 16
    if dtype == torch.bfloat16:
        return _BF16_MAX_TOKENS[_bf16_products()]
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
